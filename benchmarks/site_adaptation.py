"""Site adaptation, measured: does teaching InfMap a new hospital's readings and lung masks help
there, and is nothing forgotten on COVID-QU-Ex?

    python -m benchmarks.site_adaptation [--external ../shared/data/external-dev]
        [--data ../shared/data/covid-qu-ex] [--seed 0] [--patients 10,25,50,all]
        [--ft-steps 150] [--val-size 300] [--limit N]

1. The new hospital is ``external-dev`` (another public source, see ../shared/data/README.md).
   Its patients are split in two by a seeded permutation: half one teaches, half two is the
   hospital's own test set (patient-level, so no patient is on both sides).
2. A fresh SQLite database with the shipped model (``models/infmap.pt``) active.
3. For 10, 25, 50 and all patients of half one (cumulative; counts beyond half one's size are
   dropped): their readings (external-dev's labels) are imported through
   ``services.import_readings`` and their lung masks, where they have one, through
   ``services.import_masks`` (the app's own import paths), as ``submitted``. After each import
   ``training.finetune.finetune`` runs as the app starts it (from the active version, replay,
   held-aside check, Val gate, registration, activation rule).
4. The base and every new model are scored on half two (AUROC of COVID-19 against the rest
   within this source, accuracy of the decided class, top-label ECE, lung Dice over the images
   with a lung mask) and on a seeded COVID-QU-Ex Val subset (lung Dice, COVID-19 infection Dice,
   accuracy: nothing forgotten).

This is the one place where models are trained on external-dev; they live under ``runs/`` and
are never shipped. ``--limit N`` keeps N patients per half and runs a few steps: a smoke test
whose results go to ``<--work-dir>/limit`` (default ``runs/bench/site_adaptation``) and are not
a result.

Writes ``benchmarks/results/site_adaptation.json``, ``site_adaptation.png`` (plotly via kaleido,
else matplotlib) and ``site_adaptation.html``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import settings
from database import model_versions
from database.session import init_db, session_scope
from inference.model import CLASS_NAMES, file_sha256, load_checkpoint
from services.import_masks import import_masks
from services.import_readings import import_readings
from training import finetune as ft
from training.data import SplitArrays
from training.eval_metrics import ECE_BINS
from training.evaluate import predict_arrays
from training.external import ExternalSet, load_external
from training.gate import val_metrics
from training.metrics import dice_iou_per_image, expected_calibration_error
from training.replay import load_val

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "runs" / "bench" / "site_adaptation"
COVID = CLASS_NAMES.index("COVID-19")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--external", default=str(settings.REPO_ROOT.parent / "shared" / "data"
                                             / "external-dev"))
    p.add_argument("--data", default=str(settings.shared_data_dir()), help="COVID-QU-Ex root")
    p.add_argument("--checkpoint", default=str(settings.SHIPPED_CHECKPOINT))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patients", default="10,25,50,all", help="cumulative counts of half one")
    p.add_argument("--ft-steps", type=int, default=ft.FinetuneOptions.steps)
    p.add_argument("--batch-size", type=int, default=ft.FinetuneOptions.batch_size)
    p.add_argument("--replay-limit", type=int, default=800,
                   help="seeded COVID-QU-Ex Train replay sample (0: all of Train)")
    p.add_argument("--val-size", type=int, default=300, help="seeded COVID-QU-Ex Val subset")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--work-dir", default=str(WORK), help="database, staged files, models")
    p.add_argument("--limit", type=int, default=0,
                   help="smoke test: N patients per half, few steps, results under runs/")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the new site


def read_labels(external: Path) -> list[dict[str, str]]:
    with open(external / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def split_patients(rows: list[dict[str, str]], seed: int) -> tuple[list[str], list[str]]:
    """(half one, half two) of the patient ids by a seeded permutation."""
    patients = sorted({r["patient"] for r in rows})
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    half = len(order) // 2
    return order[:half], order[half:]


def step_counts(spec: str, available: int) -> list[int]:
    counts = [available if c.strip() == "all" else int(c) for c in spec.split(",")]
    return sorted({c for c in counts if 0 < c <= available})


def stage_lung_masks(external: Path, rows: list[dict[str, str]], dest: Path) -> Path | None:
    """Copy the rows' images that have a lung mask, and their masks, into ``dest/images`` and
    ``dest/lung`` (import_masks reads folders; only these studies get a mask version)."""
    shutil.rmtree(dest, ignore_errors=True)
    n = 0
    for r in rows:
        if r.get("has_lung_mask", "").strip() not in {"1", "true", "yes"}:
            continue
        rel = Path(r["file"])
        mask = external / "lung_masks" / rel.with_suffix(".png")
        if not mask.is_file():
            continue
        for src, dst in ((external / "images" / rel, dest / "images" / rel),
                         (mask, dest / "lung" / rel.with_suffix(".png"))):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        n += 1
    return dest if n else None


def write_csv(rows: list[dict[str, str]], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"])
        w.writerows([r["file"], r["label"]] for r in rows)
    return path


# ----------------------------------------------------------------------------- scoring


def site_scores(model: Any, test: ExternalSet) -> dict[str, Any]:
    """Half two: COVID-19-vs-rest AUROC, accuracy, ECE, lung Dice over images with a mask."""
    pred = predict_arrays(model, test.arrays)
    labels = test.arrays.labels
    is_covid = labels == COVID
    auroc = (float(roc_auc_score(is_covid, pred.probs[:, COVID]))
             if 0 < is_covid.sum() < len(labels) else None)
    has = test.has_lung_mask
    lung = (float(dice_iou_per_image(pred.lungs[has], test.arrays.lungs[has] > 0)[0].mean())
            if has.any() else None)
    return {
        "n_images": int(len(labels)), "n_covid": int(is_covid.sum()),
        "n_lung_masks": int(has.sum()),
        "auroc_covid": auroc,
        "accuracy": float((pred.predicted == labels).mean()),
        "ece": expected_calibration_error(pred.probs, labels, ECE_BINS),
        "lung_dice": lung,
    }


def subset(data: ExternalSet, keep: np.ndarray) -> ExternalSet:
    idx = np.flatnonzero(keep)
    return ExternalSet(arrays=data.arrays.subset(idx), has_lung_mask=data.has_lung_mask[idx],
                       patients=[data.patients[i] for i in idx])


def score(checkpoint: str | Path, test: ExternalSet, val: SplitArrays | None) -> dict[str, Any]:
    model = load_checkpoint(checkpoint)
    return {"site": site_scores(model, test),
            "val": val_metrics(model, val) if val is not None else None}


# ----------------------------------------------------------------------------- output


def _fmt(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        "| patients (images) | AUROC COVID-19 | accuracy | ECE | lung Dice | Val lung Dice | "
        "Val infection Dice | Val accuracy | fine-tune | whole step | activated |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [result["base"], *result["steps"]]:
        s, v = r["scores"]["site"], r["scores"]["val"] or {}
        secs, step_secs = r.get("finetune_seconds"), r.get("step_seconds")
        ft_time = "—" if secs is None else f"{secs / 60:.1f} min"
        whole = "—" if step_secs is None else f"{step_secs / 60:.1f} min"
        activated = "—" if r.get("activated") is None else ("yes" if r["activated"] else "no")
        lines.append(
            f"| {r['patients']} ({r['images']}) | {_fmt(s['auroc_covid'])} | "
            f"{_fmt(s['accuracy'])} | {_fmt(s['ece'])} | {_fmt(s['lung_dice'])} | "
            f"{_fmt(v.get('lung_dice'))} | {_fmt(v.get('infection_dice_covid'))} | "
            f"{_fmt(v.get('accuracy'))} | {ft_time} | {whole} | {activated} |"
        )
    return "\n".join(lines)


def save_figure(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Plotly figure as HTML, and as PNG via kaleido (Chromium) or matplotlib if that fails."""
    import plotly.graph_objects as go

    rows = [result["base"], *result["steps"]]
    xs = [r["patients"] for r in rows]
    series = {
        "AUROC COVID-19 (new site)": [r["scores"]["site"]["auroc_covid"] for r in rows],
        "accuracy (new site)": [r["scores"]["site"]["accuracy"] for r in rows],
        "ECE (new site)": [r["scores"]["site"]["ece"] for r in rows],
        "lung Dice (new site)": [r["scores"]["site"]["lung_dice"] for r in rows],
        "accuracy (COVID-QU-Ex Val)": [(r["scores"]["val"] or {}).get("accuracy") for r in rows],
        "lung Dice (COVID-QU-Ex Val)": [(r["scores"]["val"] or {}).get("lung_dice")
                                        for r in rows],
    }
    fig = go.Figure()
    for name, ys in series.items():
        dash = "dot" if "Val" in name else "solid"
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name,
                                 line={"dash": dash}))
    fig.update_layout(
        title=f"Site adaptation on external-dev (half two: {result['test']['images']} images, "
              f"{result['test']['patients']} patients; seed {result['settings']['seed']})",
        xaxis_title="patients of half one taught (cumulative readings + lung masks)",
        yaxis={"title": "score", "range": [0, 1]}, width=1000, height=480,
        template="plotly_white")
    written = {"html": str(out_dir / "site_adaptation.html")}
    fig.write_html(written["html"], include_plotlyjs="cdn")
    png = out_dir / "site_adaptation.png"
    png.unlink(missing_ok=True)
    if Path("/usr/bin/chromium").exists():
        os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    try:
        fig.write_image(str(png), scale=1)
        written["png"], written["png_renderer"] = str(png), "plotly+kaleido"
    except Exception as exc:  # no kaleido / no Chromium offline: matplotlib draws the same
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        f, a = plt.subplots(figsize=(10, 4.8))
        for name, ys in series.items():
            a.plot(xs, [np.nan if y is None else y for y in ys], "o" + (":" if "Val" in name
                                                                        else "-"), label=name)
        a.set_ylim(0, 1)
        a.set_xlabel("patients of half one taught")
        a.legend(fontsize=8)
        f.tight_layout()
        f.savefig(png, dpi=100)
        plt.close(f)
        written["png"], written["png_renderer"] = str(png), f"matplotlib ({type(exc).__name__})"
    return written


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_all = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    external = Path(args.external)
    smoke = bool(args.limit)
    work = Path(args.work_dir) / ("limit" if smoke else "full")
    out_dir = work if smoke else RESULTS  # a smoke test is not a result
    for stale in ("site.sqlite", "site.sqlite-wal", "site.sqlite-shm"):
        (work / stale).unlink(missing_ok=True)
    for folder in ("images", "staging", "models"):
        shutil.rmtree(work / folder, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = read_labels(external)
    half_one, half_two = split_patients(rows, args.seed)
    if smoke:
        half_one, half_two = half_one[: args.limit], half_two[: args.limit]
    teach_rows = {p: [r for r in rows if r["patient"] == p] for p in half_one}
    counts = step_counts(args.patients, len(half_one)) if not smoke else sorted(
        {max(1, len(half_one) // 2), len(half_one)})
    # fine-tuning needs two studies (one to train on, one held aside)
    counts = [n for n in counts if sum(len(teach_rows[p]) for p in half_one[:n]) >= 2]
    if not counts:
        raise SystemExit("half one has fewer than two images: nothing to fine-tune on")

    base = load_checkpoint(args.checkpoint)
    size = base.config.input_size
    every = load_external(external, size)
    test = subset(every, np.isin(every.patients, half_two))
    val_opts = ft.FinetuneOptions(db="", out="", data=args.data, seed=args.seed,
                                  val_size=8 if smoke else args.val_size)
    val = load_val(val_opts, size) if Path(args.data).is_dir() else None

    url = f"sqlite:///{work / 'site.sqlite'}"
    engine = init_db(url)
    with session_scope(engine) as s:
        model_versions.register_model_version(
            s, str(base.meta.get("version", "shipped")), str(Path(args.checkpoint).resolve()),
            file_sha256(args.checkpoint), lineage={"source": "shipped"}, activate=True)
    base_row = {"patients": 0, "images": 0, "scores": score(args.checkpoint, test, val)}
    print(f"base: {json.dumps(base_row['scores'])}", flush=True)

    steps: list[dict[str, Any]] = []
    for n in counts:
        t_step = time.monotonic()
        taught = [r for p in half_one[:n] for r in teach_rows[p]]
        readings = import_readings(engine, write_csv(taught, work / f"readings_{n}.csv"),
                                   external / "images", "site-radiologist", "submitted")
        if not readings.imported:
            raise SystemExit("\n".join(readings.lines(verbose=True)))
        staged = stage_lung_masks(external, taught, work / "staging")
        masks = (import_masks(engine, staged / "images", staged / "lung", None,
                              "site-radiologist", status="submitted")
                 if staged is not None else None)
        opts = ft.FinetuneOptions(
            db=url, out=str(work / "models" / f"after_{n}_patients.pt"), data=args.data,
            steps=4 if smoke else args.ft_steps, batch_size=4 if smoke else args.batch_size,
            replay_limit=8 if smoke else args.replay_limit, val_size=val_opts.val_size,
            seed=args.seed, threads=args.threads, cache_dir=None, progress=not smoke,
            version=f"site-{n}-patients")
        result = ft.finetune(opts, engine=engine)
        scores = score(result.checkpoint, test, val)
        step = {
            "patients": n, "images": len(taught),
            "readings_saved": readings.readings_saved,
            "lung_masks_saved": masks.versions_saved if masks is not None else 0,
            "version": result.version, "base_version": result.lineage["base_version"],
            "activated": result.activated, "decision": result.decision,
            "studies": result.lineage["studies"],
            "held_aside": result.metrics["corrections"],
            "held_aside_base": result.metrics["base"]["corrections"],
            "val_gate": result.metrics["val"],
            "scores": scores,
            "finetune_seconds": round(result.train_seconds, 1),
            "step_seconds": round(time.monotonic() - t_step, 1),
        }
        steps.append(step)
        print(f"{n} patients ({len(taught)} images): {json.dumps(scores)}; fine-tune "
              f"{step['finetune_seconds']:.0f} s; {'activated' if result.activated else 'not'}"
              f" ({result.decision})", flush=True)
    engine.dispose()

    out = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "smoke_test": smoke,
        "settings": vars(args) | {"input_size": size},
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "platform": platform.platform(), "load_average": os.getloadavg()},
        "split": {"patients_half_one": len(half_one), "patients_half_two": len(half_two)},
        "test": {"patients": len(half_two), "images": int(len(test.arrays))},
        "base": base_row,
        "steps": steps,
        "definitions": {
            "auroc_covid": "ROC AUC of P(COVID-19) for COVID-19 against Non-COVID + Normal, "
                           "within half two (one source)",
            "accuracy": "the checkpoint's decided class (inference.calibration.decide)",
            "ece": f"top-label expected calibration error, {ECE_BINS} equal-width bins, on the "
                   "calibrated probabilities",
            "lung_dice": "per-image mean Dice over half-two images with a v7labs lung mask",
            "val": "seeded COVID-QU-Ex Val subset (the fine-tuning gate's): lung Dice over all, "
                   "infection Dice over COVID-19, accuracy",
            "finetune_seconds": "the optimisation steps only",
            "step_seconds": "import + the whole finetune() call + scoring",
        },
        "total_minutes": round((time.monotonic() - t_all) / 60, 2),
    }
    out["figure"] = {k: v.replace(f"{REPO}/", "") for k, v in save_figure(out, out_dir).items()}
    (out_dir / "site_adaptation.json").write_text(json.dumps(out, indent=1))
    print(markdown_table(out))
    print(f"total {out['total_minutes']:.1f} min; wrote {out_dir / 'site_adaptation.json'}")
    return out


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
