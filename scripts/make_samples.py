"""Copy the app's embedded sample cases out of COVID-QU-Ex (Test split) into ``samples/``.

    python scripts/make_samples.py [--data ../shared/data/covid-qu-ex] [--out samples]

Two images per class, chosen deterministically: the first by sorted file name for Non-COVID and
Normal; for COVID-19 the first by sorted file name whose infection mask covers at least 10% of
the lung mask (clearly non-empty). Files are copied byte for byte (256x256 8-bit PNGs, masks
0/255) as ``<out>/<class>/<name>.png``, ``<name>_lung.png`` and ``<name>_infection.png``, where
``<name>`` is the original file name in lower case with runs of other characters turned into
``_`` ("Normal (1).png" -> "normal_1"). ``<out>/README.md`` records licence, citations and the
source of every file.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import cv2

import settings

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference.model import CLASS_NAMES  # noqa: E402
from training.data import Sample, _subset_root, list_samples  # noqa: E402

SPLIT = "Test"
MIN_INFECTION_SHARE = 0.10

# Verbatim from the dataset README (../shared/data/README.md).
LICENCE_AND_CITATIONS = """\
Licence: CC BY-SA 4.0. Cite:
- A. M. Tahir et al., "COVID-19 Infection Localization and Severity Grading from Chest X-ray
  Images", Computers in Biology and Medicine 139:105002, 2021. doi:10.1016/j.compbiomed.2021.105002
- A. M. Tahir et al., "COVID-QU-Ex", Kaggle, 2021. doi:10.34740/kaggle/dsv/3122898
- A. Degerli et al., "COVID-19 infection map generation and detection from chest X-ray images",
  Health Inf Sci Syst 9:15, 2021 (the infection masks come from their QaTa-COV19 set).
"""


def slug(file_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", Path(file_name).stem.lower()).strip("_")


def mask_share(sample: Sample) -> tuple[int, int]:
    """(lung pixels, infection pixels) of the sample's ground-truth masks."""
    lung = cv2.imread(str(sample.lung_mask), cv2.IMREAD_GRAYSCALE) > 127
    inf = cv2.imread(str(sample.infection_mask), cv2.IMREAD_GRAYSCALE) > 127
    return int(lung.sum()), int(inf.sum())


def choose(samples: list[Sample], per_class: int, min_share: float) -> list[Sample]:
    chosen: list[Sample] = []
    for label, cls in enumerate(CLASS_NAMES):
        of_class = [s for s in samples if s.label == label]  # already sorted by file name
        picked = []
        for s in of_class:
            if cls == "COVID-19":
                lung_px, inf_px = mask_share(s)
                if lung_px == 0 or inf_px < min_share * lung_px:
                    continue
            picked.append(s)
            if len(picked) == per_class:
                break
        if len(picked) < per_class:
            raise RuntimeError(f"only {len(picked)} suitable {cls} images in {SPLIT}")
        chosen += picked
    return chosen


def relative_source(path: Path, data_root: Path) -> str:
    base = _subset_root(data_root)
    return str(Path(base.name) / path.relative_to(base))


def make_samples(data: Path, out: Path, per_class: int = 2,
                 min_share: float = MIN_INFECTION_SHARE) -> list[dict]:
    chosen = choose(list_samples(data, SPLIT), per_class, min_share)
    for cls in CLASS_NAMES:  # the folder is generated: start clean so reruns match exactly
        for old in (out / cls).glob("*.png"):
            old.unlink()
    rows = []
    for s in chosen:
        name = slug(s.image.name)
        dest = out / s.class_name
        dest.mkdir(parents=True, exist_ok=True)
        files = {"image": (s.image, dest / f"{name}.png"),
                 "lung mask": (s.lung_mask, dest / f"{name}_lung.png"),
                 "infection mask": (s.infection_mask, dest / f"{name}_infection.png")}
        for src, dst in files.values():
            shutil.copyfile(src, dst)
        lung_px, inf_px = mask_share(s)
        rows.append({"class": s.class_name, "name": name, "original": s.image.name,
                     "files": {k: (relative_source(src, data), str(dst.relative_to(out)))
                               for k, (src, dst) in files.items()},
                     "infection_share": inf_px / lung_px if lung_px else 0.0})
    (out / "README.md").write_text(readme(rows, per_class, min_share))
    return rows


def readme(rows: list[dict], per_class: int, min_share: float) -> str:
    lines = [
        "# Sample cases",
        "",
        f"{len(rows)} frontal chest X-rays ({per_class} per class) with their lung and infection "
        "masks, copied unchanged (256x256 8-bit grayscale PNG; masks 0/255) from the "
        f"**{SPLIT}** split of the COVID-QU-Ex dataset, \"Infection Segmentation Data\" subset. "
        "The app offers them as built-in examples. They are not training data: the model never "
        "saw the Test split during training or model selection.",
        "",
        "Regenerate with `python scripts/make_samples.py --data <COVID-QU-Ex root>`. Selection "
        "(deterministic): the first images by sorted file name in each class folder; for "
        f"COVID-19 only images whose infection mask covers at least {min_share:.0%} of the lung "
        "mask. Non-COVID and Normal infection masks are empty by construction (the dataset "
        "annotates COVID-19 infection only).",
        "",
        "Per case: `<class>/<name>.png` (image), `<name>_lung.png` (lung mask), "
        "`<name>_infection.png` (infection mask).",
        "",
        "| class | case | original file | infected share of lungs (ground truth) |",
        "|---|---|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['class']} | `{r['class']}/{r['name']}.png` | {r['original']} | "
                     f"{100 * r['infection_share']:.1f}% |")
    lines += ["", "## Where each file came from", "",
              "Paths relative to the COVID-QU-Ex download root.", ""]
    for r in rows:
        for kind, (src, dst) in r["files"].items():
            lines.append(f"- `{dst}` ({kind}) <- `{src}`")
    lines += ["", "## Licence and citations", "",
              "These files are part of COVID-QU-Ex and stay under its licence; derivatives must be "
              "shared alike.", "", LICENCE_AND_CITATIONS.rstrip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=settings.cli_path,
                   default=REPO.parent / "shared" / "data" / "covid-qu-ex")
    p.add_argument("--out", type=settings.cli_path, default=REPO / "samples")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--min-infection-share", type=float, default=MIN_INFECTION_SHARE)
    args = p.parse_args(argv)
    rows = make_samples(args.data, args.out, args.per_class, args.min_infection_share)
    for r in rows:
        print(f"{r['class']:<10} {r['name']:<18} <- {r['original']}  "
              f"(infection {100 * r['infection_share']:.1f}% of lungs)")
    print(f"wrote {len(rows)} cases ({3 * len(rows)} PNGs) and README.md to {args.out}")


if __name__ == "__main__":
    main()
