"""The one-page study report (issue 12.4): what it shows, PNG and PDF, and the batch command's
``--report``."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import settings
from inference.batch import main
from inference.model import ModelConfig, build_model, save_checkpoint
from inference.study_report import ReportContent, figure, render

H, W = 300, 260


def content(reading: str | None = "COVID-19 · approved · version 4 by Dr Signer") -> ReportContent:
    lung = np.zeros((H, W), bool)
    lung[40:260, 20:240] = True
    infection = np.zeros((H, W), bool)
    infection[100:160, 30:90] = True
    return ReportContent(
        title="Study #7", pixels=np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W),
        lung_mask=lung, infection_mask=infection, gradcam=np.zeros((50, 40), np.float32),
        gradcam_class="COVID-19",
        probabilities={"COVID-19": 0.71, "Non-COVID": 0.19, "Normal": 0.10},
        predicted_class="COVID-19", infection_percent=12.3, infection_percent_left=4.0,
        infection_percent_right=20.6, severity="mild", severity_score=2,
        model_version="2.0.1", masks_source="approved · Ann Author", reading=reading,
        made=datetime(2026, 12, 1, 23, 0, tzinfo=UTC),
    )


def _texts(fig) -> str:  # noqa: ANN001
    found = [t.get_text() for t in fig.texts]
    found += [fig._suptitle.get_text()] if fig._suptitle is not None else []
    for ax in fig.axes:
        found += [ax.get_title()] + [t.get_text() for t in ax.texts]
        found += [label.get_text() for label in ax.get_yticklabels()]
    return " | ".join(found)


def test_the_report_shows_everything_the_issue_asks_for() -> None:
    fig = figure(content())
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 4  # X-ray, lung, infection, Grad-CAM
    text = _texts(fig)
    for expected in ("Study #7", "Model 2.0.1", "0.71", "0.19", "0.10", "Non-COVID",
                     "12.3 %", "20.6 %", "4.0 %", "mild (2/8)", "Dr Signer", "approved",
                     "Grad-CAM: COVID-19", "Decision support only"):
        assert expected in text, expected
    assert "none recorded" in _texts(figure(content(reading=None)))


def test_png_and_pdf_are_one_page() -> None:
    png = render(content(), "png")
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] > image.shape[0] > 800  # A4 landscape
    pdf = render(content(), "pdf")
    assert pdf.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf)) == 1
    with pytest.raises(ValueError, match="format"):
        render(content(), "svg")


def test_batch_writes_a_report_per_image(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = ModelConfig(input_size=128, decoder_channels=[16, 8, 8, 8, 8])
    ckpt = save_checkpoint(build_model(small).eval(), tmp_path / "small.pt",
                           meta={"version": "report-test"})
    src = tmp_path / "in" / "sub"
    src.mkdir(parents=True)
    sample = next(p for p in sorted((settings.SAMPLES_DIR / "COVID-19").glob("*.png"))
                  if not p.stem.endswith(("_lung", "_infection")))
    shutil.copy(sample, src / "a.png")
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), "--out", str(out), "--checkpoint", str(ckpt),
                 "--report", "png"]) == 0
    (report,) = (out / "reports").rglob("*_report.png")
    assert report.name == "case-0001_report.png"  # the default names cases, not files
    assert cv2.imread(str(report)) is not None
    assert main([str(tmp_path / "in"), "--out", str(tmp_path / "out2"), "--checkpoint",
                 str(ckpt)]) == 0
    assert not (tmp_path / "out2" / "reports").exists()  # only when asked
