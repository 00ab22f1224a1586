"""Record what the shipped checkpoint predicts on the bundled samples, for the regression test.

    python scripts/record_reference.py [--checkpoint models/infmap.pt]

Writes ``models/reference_prediction.json`` (checkpoint SHA-256, per-sample class probabilities,
infected shares, severity) and ``models/reference/<case>_{lung,infection}.png`` (the predicted
masks). ``tests/test_shipped_model.py`` reloads the checkpoint and checks it reproduces these.
Re-run it whenever ``models/infmap.pt`` is replaced on purpose.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import settings  # noqa: E402,F401 - sets HF_HUB_OFFLINE before timm loads

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference.loading import load_xray  # noqa: E402
from inference.model import DEFAULT_CHECKPOINT, load_checkpoint  # noqa: E402
from inference.predict import predict  # noqa: E402

REFERENCE_JSON = REPO / "models" / "reference_prediction.json"
REFERENCE_DIR = REPO / "models" / "reference"
# One case per class: enough to catch a changed or mis-loaded checkpoint, small in the repo.
CASES = ("COVID-19/covid_1582.png", "Non-COVID/non_covid_11905.png", "Normal/normal_1.png")


def record(checkpoint: Path) -> dict:
    model = load_checkpoint(checkpoint)
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    cases = {}
    for case in CASES:
        pred = predict(load_xray(REPO / "samples" / case), model)
        stem = Path(case).stem
        for kind, mask in (("lung", pred.lung_mask), ("infection", pred.infection_mask)):
            cv2.imwrite(str(REFERENCE_DIR / f"{stem}_{kind}.png"), mask.astype(np.uint8) * 255)
        cases[case] = {
            "probabilities": pred.probabilities,
            "predicted_class": pred.predicted_class,
            "infection_percent": pred.infection_percent,
            "infection_percent_left": pred.infection_percent_left,
            "infection_percent_right": pred.infection_percent_right,
            "severity": pred.severity,
            "ood_score": pred.ood_score,
            "in_domain": pred.in_domain,
            "lung_mask": f"reference/{stem}_lung.png",
            "infection_mask": f"reference/{stem}_infection.png",
        }
    return {"checkpoint": checkpoint.name, "sha256": model.sha256, "version": model.version,
            "cases": cases}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=settings.cli_path_str, default=str(DEFAULT_CHECKPOINT))
    args = p.parse_args()
    result = record(Path(args.checkpoint))
    REFERENCE_JSON.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
