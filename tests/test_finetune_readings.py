"""training.finetune learning readings (issue 11.2): studies with only a reading (class loss
only), only masks (segmentation losses only) and both, on a temporary SQLite database and the
bundled samples (real COVID-QU-Ex images). Readings come in through
``services.import_readings`` and masks through ``services.import_masks`` (the app's import
paths); the base is the small empty-mask network of tests/test_finetune.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from covid_qu_ex import SUBSET, build_mini_tree, sample_cases
from test_finetune import SMALL, _empty_mask_model

import settings
from database import model_versions
from database.session import init_db, session_scope
from inference.loading import load_xray
from inference.model import CLASS_NAMES, file_sha256, load_checkpoint, save_checkpoint
from services import model_admin
from services.import_masks import import_masks
from services.import_readings import import_readings
from training import finetune as ft
from training.corrections import letterbox_uint8
from training.data import SplitArrays
from training.evaluate import predict_arrays
from training.gate import decide
from training.losses import NO_LABEL, MultiTaskLoss

CASES = sample_cases()  # six (class, stem); studies s0..s5 below


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the real model may be training on this machine
    yield
    torch.set_num_threads(before)


def _images(dest: Path) -> Path:
    for cls, stem in CASES:
        (dest / cls).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(settings.SAMPLES_DIR / cls / f"{stem}.png", dest / cls / f"{stem}.png")
    return dest


def _mask_dirs(tmp: Path, keep: list[int]) -> dict[str, Path]:
    """The samples ``keep`` as a COVID-QU-Ex Train split (the folders import_masks reads)."""
    root = build_mini_tree(tmp / "masks-tree", splits=("Train",)) / SUBSET
    images = root / SUBSET
    for i, (cls, stem) in enumerate(CASES):
        if i not in keep:
            (images / "Train" / cls / "images" / f"{stem}.png").unlink()
    return {"images": images, "lung": root / "Lung Masks", "infection": root / "Infection Masks"}


def _readings_csv(path: Path, labels: dict[int, str]) -> Path:
    lines = ["file,label"] + [f"{CASES[i][0]}/{CASES[i][1]}.png,{label}"
                              for i, label in labels.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _base_predictions(base_path: Path) -> np.ndarray:
    """The base model's class for each sample, on the grid fine-tuning uses."""
    squares = [letterbox_uint8(load_xray(settings.SAMPLES_DIR / c / f"{s}.png").pixels,
                               SMALL.input_size)[0] for c, s in CASES]
    n = len(squares)
    empty = np.zeros((n, SMALL.input_size, SMALL.input_size), np.uint8)
    arrays = SplitArrays(np.stack(squares), empty, empty, np.zeros(n, np.int64), ["x"] * n)
    return predict_arrays(load_checkpoint(base_path), arrays).predicted


def _world(tmp: Path, masks: list[int], labels: dict[int, str]) -> dict:
    url = f"sqlite:///{tmp / 'db' / 'infmap.sqlite'}"
    engine = init_db(url)
    base_path = save_checkpoint(_empty_mask_model(), tmp / "base.pt", meta={"version": "base"})
    if masks:
        d = _mask_dirs(tmp, masks)
        assert import_masks(engine, d["images"], d["lung"], d["infection"], "ann").images_new
    if labels:
        summary = import_readings(engine, _readings_csv(tmp / "labels.csv", labels),
                                  _images(tmp / "images"), "rad", "approved", "radiologist")
        assert summary.imported, summary.lines(verbose=True)
    with session_scope(engine) as s:
        model_versions.register_model_version(s, "base", str(base_path), file_sha256(base_path),
                                              activate=True)
    replay_root = build_mini_tree(tmp / "qu-ex", copies=2, splits=("Train", "Val"))
    return {"tmp": tmp, "url": url, "engine": engine, "base_path": base_path,
            "data": replay_root}


def _opts(world: dict, name: str, **kw) -> ft.FinetuneOptions:
    defaults = dict(db=world["url"], out=str(world["tmp"] / "models" / f"{name}.pt"),
                    data=str(world["data"]), steps=10, batch_size=4, lr=1e-2, replay_ratio=0.5,
                    replay_limit=8, val_size=6, seed=0, threads=1, progress=False,
                    cache_dir=None)
    defaults.update(kw)
    return ft.FinetuneOptions(**defaults)


def test_loss_skips_masks_of_reading_only_samples() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 8, 8, requires_grad=True)
    classes = torch.randn(4, 3, requires_grad=True)
    masks = (torch.rand(4, 2, 8, 8) > 0.5).float()
    labels = torch.tensor([0, NO_LABEL, 2, 1])
    known = torch.tensor([True, True, False, False])
    loss_fn = MultiTaskLoss()
    _, mixed = loss_fn(logits, classes, masks, labels, known)
    _, only_known = loss_fn(logits[:2], classes, masks[:2], labels)
    assert mixed["lung"] == pytest.approx(only_known["lung"])
    assert mixed["infection"] == pytest.approx(only_known["infection"])
    assert mixed["class"] == pytest.approx(only_known["class"])  # class over all labelled
    total, parts = loss_fn(logits, classes, masks, labels, torch.zeros(4, dtype=torch.bool))
    assert parts["lung"] == parts["infection"] == 0.0
    total.backward()
    assert logits.grad is not None and not logits.grad.any()  # no mask gradient at all
    assert classes.grad is not None and classes.grad.any()


def test_readings_only_train_the_class_head(tmp_path: Path) -> None:
    base_path = save_checkpoint(_empty_mask_model(), tmp_path / "probe.pt")
    never = next(i for i in range(3) if i not in set(_base_predictions(base_path).tolist()))
    target = CLASS_NAMES[never]  # a class the base calls for none of the samples
    labels = {i: target for i in range(5)} | {5: "not assessable"}  # s5: not a class target
    world = _world(tmp_path, masks=[], labels=labels)
    # No replay, so nothing but the readings trains (and no masks at all).
    result = ft.finetune(_opts(world, "readings", replay_ratio=0.0, steps=12),
                         engine=world["engine"])
    lin, m = result.lineage, result.metrics
    assert lin["studies"] == {"masks_only": 0, "reading_only": 5, "both": 0,
                              "readings_not_class_targets": 0}  # s5 had nothing to teach
    assert lin["annotation_version_ids"] == [] and lin["model_filled_masks"] == 0
    assert len(lin["reading_version_ids"]) + len(lin["held_aside_reading_version_ids"]) == 5
    assert m["trained_on"] == {"masks": 0, "readings": len(lin["reading_version_ids"])}
    held, base_held = m["corrections"], m["base"]["corrections"]
    assert held["score"] is None and held["n_lung"] == 0  # no mask to score on
    assert held["n_readings"] == base_held["n_readings"] == len(lin["held_aside_image_ids"])
    assert base_held["reading_accuracy"] == 0.0  # the base never calls that class
    assert held["reading_accuracy"] == 1.0  # learned from the readings alone
    assert 0.0 <= held["reading_ece"] <= 1.0 and 0.0 <= base_held["reading_ece"] <= 1.0
    # Better on the held-aside readings; whether it activates is then Val's (accuracy too).
    assert not result.decision.startswith(("worse on held-aside", "not better on held-aside"))
    # The Models page's figures for the run.
    def scope(write: bool = True):  # noqa: ANN202
        return session_scope(world["engine"], write=write)

    rec = next(r for r in model_admin.version_records(scope)
               if r["id"] == result.model_version_id)
    assert (rec["held_accuracy"], rec["held_accuracy_base"]) == (1.0, 0.0)
    assert rec["readings"] == len(lin["reading_version_ids"])
    assert model_admin.readings_available(scope) == 5  # s5's "not assessable" is no class


def test_decide_rule_with_readings() -> None:
    val = {"lung_dice": 0.9, "infection_dice_covid": 0.6, "accuracy": 0.8}
    no_masks = {"score": None}
    base = {"corrections": {**no_masks, "reading_accuracy": 0.5, "reading_ece": 0.3},
            "val": val}

    def new(acc: float, ece: float, val_acc: float = 0.8, readings: int = 3) -> dict:
        return {"corrections": {**no_masks, "reading_accuracy": acc, "reading_ece": ece},
                "val": {**val, "accuracy": val_acc}, "trained_on": {"readings": readings}}

    assert decide(base, new(0.75, 0.3), 0.01)[0]
    assert decide(base, new(0.5, 0.2), 0.01)[0]  # same accuracy, better calibrated
    assert not decide(base, new(0.5, 0.3), 0.01)[0]  # nothing better
    assert "worse on held-aside readings" in decide(base, new(0.25, 0.1), 0.01)[1]
    assert "worse on Val accuracy" in decide(base, new(0.75, 0.3, val_acc=0.7), 0.01)[1]
    assert decide(base, new(0.75, 0.3, val_acc=0.7, readings=0), 0.01)[0]  # masks-only run
    both_base = {**base, "corrections": {**base["corrections"], "score": 0.6}}
    masks_worse = new(0.75, 0.3)
    masks_worse["corrections"]["score"] = 0.55
    assert "worse on held-aside corrections Dice" in decide(both_base, masks_worse, 0.01)[1]
    assert not decide({"corrections": no_masks, "val": val}, new(1.0, 0.0), 0.01)[0]


def test_masks_only_and_both(tmp_path: Path) -> None:
    # s0 both; s1 masks + "other finding" (masks only); s2 masks only; s3, s4 reading only;
    # s5 "not assessable" only: left out.
    labels = {0: CASES[0][0], 1: "Other finding", 3: CASES[3][0], 4: CASES[4][0],
              5: "not assessable"}
    world = _world(tmp_path, masks=[0, 1, 2], labels=labels)
    both = ft.finetune(_opts(world, "both", tolerance=1.0), engine=world["engine"])
    lin = both.lineage
    assert lin["studies"] == {"masks_only": 2, "reading_only": 2, "both": 1,
                              "readings_not_class_targets": 1}
    assert len(lin["train_image_ids"]) + len(lin["held_aside_image_ids"]) == 5
    assert len(lin["reading_version_ids"] + lin["held_aside_reading_version_ids"]) == 4
    assert both.metrics["trained_on"]["masks"] + both.metrics["trained_on"]["readings"] >= 3
    assert both.metrics["corrections"]["n_images"] == len(lin["held_aside_image_ids"])

    # The same database with readings ignored: masks only, as before readings existed.
    with session_scope(world["engine"]) as s:
        base_id = model_versions.get_model_version(s, "base").id
        model_versions.set_active_model_version(s, base_id)
    masks = ft.finetune(_opts(world, "masks", readings=False, tolerance=1.0),
                        engine=world["engine"])
    lin = masks.lineage
    assert lin["studies"] == {"masks_only": 3, "reading_only": 0, "both": 0,
                              "readings_not_class_targets": 0}
    assert lin["reading_version_ids"] == lin["held_aside_reading_version_ids"] == []
    assert masks.metrics["trained_on"] == {"masks": len(lin["train_image_ids"]), "readings": 0}
    held = masks.metrics["corrections"]
    assert held["n_readings"] == 0 and held["reading_accuracy"] is None
    assert held["score"] is not None  # judged on the masks' Dice
    assert masks.lineage["data_hash"] != both.lineage["data_hash"]
