"""Does the human-machine loop work? Simulated annotators, real fine-tuning, held-out Dice.

    python -m benchmarks.annotation_loop [--data ../shared/data/covid-qu-ex] [--seed 0]
        [--corrections 10,25,50,100] [--base-steps 200] [--ft-steps 120] [--tiny]

1. A weak base model: trained with a fixed seed for ``--base-steps`` steps (a few minutes) on the
   Normal and Non-COVID Train images only, so it has never seen an infection mask. Cached under
   ``runs/bench/`` so reruns skip it.
2. A fresh SQLite database with the base registered as the active model version.
3. The oracle: ground-truth lung + infection masks of COVID-19 Train images (a seeded choice)
   imported as ``submitted`` annotation versions through ``services.import_masks`` (the app's
   import path), cumulatively 10, 25, 50, 100. After each import ``training.finetune.finetune``
   runs exactly as the app starts it (from the active version, replay of the base's own training
   classes, held-aside check, Val gate, registration, activation rule).
4. Every new model is scored on a fixed held-out set the corrections never include: 150 COVID-19
   + 50 Non-COVID/Normal Val images (seeded), excluded from the fine-tuning's Val gate as well.
   Infection Dice over the COVID-19 images, lung Dice over all 200; per-image mean, an image
   where prediction and ground truth are both empty scores 1 (training.metrics).

Writes ``benchmarks/results/annotation_loop.json``, ``annotation_loop.png`` (plotly via kaleido,
falling back to matplotlib) and ``annotation_loop.html``; prints a markdown table.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import settings  # noqa: E402,F401 - sets HF_HUB_OFFLINE before timm loads
from database import model_versions  # noqa: E402
from database.session import init_db, session_scope  # noqa: E402
from inference.model import (  # noqa: E402
    CLASS_NAMES,
    ModelConfig,
    build_model,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from services.import_masks import import_masks  # noqa: E402
from training import finetune as ft  # noqa: E402
from training.data import SplitArrays, list_samples, load_split, to_tensors  # noqa: E402
from training.finetune_train import batches as ft_batches  # noqa: E402
from training.gate import val_metrics  # noqa: E402
from training.loop import lr_at, train_step  # noqa: E402
from training.losses import MultiTaskLoss  # noqa: E402
from training.replay import read_samples  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "runs" / "bench"
BASE_CLASSES = ("Non-COVID", "Normal")
COVID = CLASS_NAMES.index("COVID-19")
SUBSET = "Infection Segmentation Data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=settings.cli_path_str, default=str(settings.shared_data_dir()),
                   help="COVID-QU-Ex root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corrections", default="10,25,50,100", help="cumulative counts")
    p.add_argument("--base-steps", type=int, default=200, help="base model training steps")
    p.add_argument("--base-lr", type=float, default=2e-3)
    p.add_argument("--ft-steps", type=int, default=ft.FinetuneOptions.steps)
    p.add_argument("--ft-lr", type=float, default=ft.FinetuneOptions.lr)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--heldout-covid", type=int, default=150)
    p.add_argument("--heldout-other", type=int, default=50)
    p.add_argument("--val-size", type=int, default=ft.FinetuneOptions.val_size,
                   help="fine-tuning's own Val gate subset (disjoint from the held-out set)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache-dir", type=settings.cli_path_str, default=".cache/covid-qu-ex")
    p.add_argument("--work-dir", type=settings.cli_path_str, default=str(WORK))
    p.add_argument("--out-dir", type=settings.cli_path_str, default=str(RESULTS))
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: 128 px model, a few steps, small sets (not a result)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


def heldout_set(root: str, n_covid: int, n_other: int, seed: int, size: int) -> SplitArrays:
    """``n_covid`` COVID-19 + ``n_other`` Non-COVID/Normal Val images, a seeded choice."""
    def pick(samples: list) -> list:
        rng = np.random.default_rng(seed + 100)
        covid = [s for s in samples if s.label == COVID]
        other = [s for s in samples if s.label != COVID]
        return ([covid[i] for i in np.sort(rng.permutation(len(covid))[:n_covid])]
                + [other[i] for i in np.sort(rng.permutation(len(other))[:n_other])])

    return read_samples(root, "Val", size, pick)


def oracle_order(root: str, seed: int) -> list:
    """COVID-19 Train samples in the seeded order the oracle corrects them."""
    covid = [s for s in list_samples(root, "Train") if s.label == COVID]
    return [covid[i] for i in np.random.default_rng(seed + 200).permutation(len(covid))]


def stage_corrections(samples: list, staging: Path) -> dict[str, Path]:
    """Copy image + masks into a folder tree that ``import_masks`` reads (same layout). Copies,
    not symlinks: the importer never follows a link out of the folders it is given."""
    dirs = {"images": staging / "images", "lung": staging / "lung", "infection": staging / "inf"}
    for s in samples:
        for key, src in (("images", s.image), ("lung", s.lung_mask),
                         ("infection", s.infection_mask)):
            target = dirs[key] / src.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                shutil.copyfile(src, target)
    return dirs


# ----------------------------------------------------------------------------- base model


def train_base(args: argparse.Namespace, config: ModelConfig, path: Path) -> dict[str, Any]:
    """Seeded training on Normal + Non-COVID Train only; the class head never sees COVID-19 and
    the infection channel only ever sees empty masks."""
    keep = [CLASS_NAMES.index(c) for c in BASE_CLASSES]
    if args.tiny:
        def pick(samples: list) -> list:
            pool = [s for s in samples if s.label in keep]
            return [pool[i] for i in np.sort(np.random.default_rng(args.seed).permutation(
                len(pool))[:64])]

        data = read_samples(args.data, "Train", config.input_size, pick)
    else:
        full = load_split(args.data, "Train", config.input_size, args.cache_dir or None)
        data = full.subset(np.flatnonzero(np.isin(full.labels, keep)))
    torch.manual_seed(args.seed)
    model = build_model(config).to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.base_lr, weight_decay=1e-4)
    loss_fn = MultiTaskLoss()
    gen = torch.Generator().manual_seed(args.seed)
    batches = ft_batches(len(data), args.batch_size, np.random.default_rng(args.seed))
    warmup = max(1, args.base_steps // 10)
    t0 = time.monotonic()
    for step in tqdm(range(args.base_steps), desc="base (no COVID-19)", mininterval=5):
        img, masks, labels = to_tensors(data, next(batches))
        train_step(model, optimizer, loss_fn, img, masks, labels, gen, config,
                   lr_at(step, args.base_steps, args.base_lr, warmup))
    seconds = time.monotonic() - t0
    model = model.to(memory_format=torch.contiguous_format).eval()
    info = {"classes": list(BASE_CLASSES), "images": len(data), "steps": args.base_steps,
            "batch_size": args.batch_size, "lr": args.base_lr, "seed": args.seed,
            "train_seconds": round(seconds, 1)}
    save_checkpoint(model, path, half=True, meta={
        "version": "no-covid-base",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_data": "COVID-QU-Ex Train, Normal + Non-COVID only (benchmark base)",
        "benchmark_base": info,
    })
    return info


# ----------------------------------------------------------------------------- outputs


def markdown_table(base: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "| corrections | trained on / held aside | infection Dice (COVID-19, n={n_c}) | "
        "lung Dice (all, n={n}) | fine-tune time | run total | activated |".format(
            n_c=base["n_covid"], n=base["n_images"]),
        "|---:|---:|---:|---:|---:|---:|:--|",
        f"| 0 (base) | - | {base['infection_dice_covid']:.3f} | {base['lung_dice']:.3f} "
        "| - | - | (base) |",
    ]
    for r in rows:
        lines.append(
            f"| {r['corrections']} | {r['trained_on']} / {r['held_aside']} | "
            f"{r['heldout']['infection_dice_covid']:.3f} | {r['heldout']['lung_dice']:.3f} | "
            f"{r['finetune_seconds'] / 60:.1f} min | {r['run_seconds'] / 60:.1f} min | "
            f"{'yes' if r['activated'] else 'no'} |")
    return "\n".join(lines)


def save_figure(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Plotly figure as HTML, and as PNG via kaleido (Chromium) or matplotlib if that fails."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    xs = [0] + [r["corrections"] for r in result["steps"]]
    inf = [result["base"]["infection_dice_covid"]] + [
        r["heldout"]["infection_dice_covid"] for r in result["steps"]]
    lung = [result["base"]["lung_dice"]] + [r["heldout"]["lung_dice"] for r in result["steps"]]
    minutes = [r["finetune_seconds"] / 60 for r in result["steps"]]
    h = result["settings"]
    title = (f"Annotation loop: held-out Val ({h['heldout_covid']} COVID-19 + "
             f"{h['heldout_other']} other), seed {h['seed']}")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35],
                        subplot_titles=("Held-out Dice vs oracle corrections",
                                        "Fine-tuning time per step"))
    fig.add_trace(go.Scatter(x=xs, y=inf, mode="lines+markers", name="infection Dice (COVID-19)"),
                  1, 1)
    fig.add_trace(go.Scatter(x=xs, y=lung, mode="lines+markers", name="lung Dice (all)"), 1, 1)
    fig.add_trace(go.Bar(x=[str(x) for x in xs[1:]], y=minutes, name="fine-tune minutes",
                         marker_color="grey"), 1, 2)
    fig.update_xaxes(title_text="corrected studies (cumulative)", row=1, col=1)
    fig.update_yaxes(title_text="per-image mean Dice", range=[0, 1], row=1, col=1)
    fig.update_xaxes(title_text="corrected studies", row=1, col=2)
    fig.update_yaxes(title_text="minutes", row=1, col=2)
    fig.update_layout(title=title, width=1000, height=450, template="plotly_white")
    written = {"html": str(out_dir / "annotation_loop.html")}
    fig.write_html(written["html"], include_plotlyjs="cdn")
    png = out_dir / "annotation_loop.png"
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

        f, (a, b) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [2, 1]})
        a.plot(xs, inf, "o-", label="infection Dice (COVID-19)")
        a.plot(xs, lung, "o-", label="lung Dice (all)")
        a.set_ylim(0, 1)
        a.set_xlabel("corrected studies (cumulative)")
        a.set_ylabel("per-image mean Dice")
        a.legend()
        b.bar([str(x) for x in xs[1:]], minutes, color="grey")
        b.set_xlabel("corrected studies")
        b.set_ylabel("fine-tune minutes")
        f.suptitle(title)
        f.tight_layout()
        f.savefig(png, dpi=110)
        plt.close(f)
        written["png"], written["png_renderer"] = str(png), f"matplotlib (kaleido: {exc})"
    return written


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_all = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.corrections.split(",")]
    config = ModelConfig()
    if args.tiny:
        config = ModelConfig(input_size=128, decoder_channels=[16, 8, 8, 8, 8])
        args.heldout_covid, args.heldout_other, args.val_size = 6, 2, 8
    work = Path(args.work_dir) / ("tiny" if args.tiny else "full")
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work if args.tiny else Path(args.out_dir)  # a smoke test is not a result
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. the weak base model (cached)
    base_path = work / f"base_no_covid_s{args.seed}_n{args.base_steps}_{config.input_size}.pt"
    if base_path.is_file():
        base_info = load_checkpoint(base_path).meta["benchmark_base"] | {"cached": True}
    else:
        base_info = train_base(args, config, base_path) | {"cached": False}

    # 2. a fresh database with the base active
    db_file = work / "annotation_loop.sqlite"
    for stale in (db_file, Path(f"{db_file}-wal"), Path(f"{db_file}-shm"), work / "images",
                  work / "staging", work / "models"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    url = f"sqlite:///{db_file}"
    engine = init_db(url)
    with session_scope(engine) as s:
        model_versions.register_model_version(
            s, "no-covid-base", str(base_path), file_sha256(base_path),
            lineage={"source": "benchmark base", **base_info}, activate=True)

    # 3. the fixed held-out set and the base's score on it
    heldout = heldout_set(args.data, args.heldout_covid, args.heldout_other, args.seed,
                          config.input_size)
    base_scores = val_metrics(load_checkpoint(base_path), heldout)
    print(f"base on held-out: {json.dumps(base_scores)}")

    oracle = oracle_order(args.data, args.seed)
    rows: list[dict[str, Any]] = []
    for n in counts:
        dirs = stage_corrections(oracle[:n], work / "staging")
        summary = import_masks(engine, dirs["images"], dirs["lung"], dirs["infection"],
                               "oracle", status="submitted")
        opts = ft.FinetuneOptions(
            db=url, out=str(work / "models" / f"after_{n}.pt"), data=args.data,
            steps=3 if args.tiny else args.ft_steps, batch_size=4 if args.tiny else args.batch_size,
            lr=args.ft_lr, replay_classes=BASE_CLASSES, replay_limit=16 if args.tiny else 0,
            val_size=args.val_size, val_exclude=tuple(heldout.names), seed=args.seed,
            threads=args.threads, cache_dir=args.cache_dir or None,
            version=f"oracle-{n}")
        t0 = time.monotonic()
        result = ft.finetune(opts, engine=engine)
        run_seconds = time.monotonic() - t0
        scores = val_metrics(load_checkpoint(result.checkpoint), heldout)
        row = {
            "corrections": n,
            "imported_versions": summary.versions_saved,
            "trained_on": len(result.lineage["train_image_ids"]),
            "held_aside": len(result.lineage["held_aside_image_ids"]),
            "version": result.version,
            "base_version": result.lineage["base_version"],
            "activated": result.activated,
            "decision": result.decision,
            "heldout": scores,
            "held_aside_corrections": result.metrics["corrections"],
            "val_gate": result.metrics["val"],
            "finetune_seconds": round(result.train_seconds, 1),
            "run_seconds": round(run_seconds, 1),
            "data_hash": result.lineage["data_hash"],
        }
        rows.append(row)
        print(f"{n} corrections: infection Dice {scores['infection_dice_covid']:.3f}, lung Dice "
              f"{scores['lung_dice']:.3f}, fine-tune {row['finetune_seconds']:.0f} s, "
              f"{'activated' if result.activated else 'not activated'} ({result.decision})")
    engine.dispose()

    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "tiny": bool(args.tiny),
        "settings": {k: v for k, v in vars(args).items() if k not in ("work_dir", "out_dir")}
        | {"input_size": config.input_size,
           "finetune_defaults": {k: v for k, v in asdict(ft.FinetuneOptions(db="", out="")).items()
                                 if k in ("lr", "replay_ratio", "holdout", "tolerance",
                                          "batch_size", "weight_decay")}},
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "platform": platform.platform()},
        "base_model": base_info,
        "base": base_scores,
        "steps": rows,
        "definitions": {
            "heldout": "COVID-QU-Ex Val images never used for training or for the fine-tuning's "
                       "Val gate; infection Dice over its COVID-19 images, lung Dice over all",
            "dice": "per-image Dice, mean over images; both masks empty scores 1, exactly one "
                    "empty scores 0; masks = sigmoid > 0.5, infection ANDed with lungs",
            "finetune_seconds": "the optimisation steps only (training.finetune train_seconds)",
            "run_seconds": "the whole finetune() call: loading, base + new evaluation, saving, "
                           "registering",
        },
        "total_minutes": round((time.monotonic() - t_all) / 60, 2),
    }
    name = "annotation_loop_tiny" if args.tiny else "annotation_loop"
    result["figure"] = {k: v.replace(f"{REPO}/", "")  # repo-relative paths in the JSON
                        for k, v in save_figure(result, out_dir).items()}
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(markdown_table(base_scores, rows))
    print(f"total {result['total_minutes']:.1f} min; wrote {out_dir / (name + '.json')}")
    return result


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
