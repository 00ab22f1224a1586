"""Clicks to a good mask (issue 14.3): a simulated annotator corrects lung and infection masks
of a COVID-QU-Ex split by clicks, with click-guided refinement and with a brush.

    .venv/bin/python -m benchmarks.interactive --data ../shared/data/covid-qu-ex --split Test \
        --cache-dir .cache/covid-qu-ex --out benchmarks/results/interactive.json

The annotator works as in the interactive-segmentation literature (RITM, DeepGrow): each click
is at the centre of the largest remaining error (the pixel of the largest 8-connected error
region farthest from its border), positive where the mask misses the reference and negative
where it wrongly has it, at most ``--max-clicks`` (20). After each click the Dice with the
reference is taken, per image (two empty masks agree: 1.0).

- ``model``: the click-refinement network (``inference.click_model``, ``--click-checkpoint``):
  after each click it sees all clicks so far and the current masks (``training.click_eval``).
- ``click``: ``inference.click_refine.refine``, the probability-guided baseline, with the
  ordinary model's probability map for that mask.
- ``brush``: the fair baseline, a disk of radius 3 % of the image side painted or erased at the
  same place.

Both start from the model's mask ("from the prediction") and from an empty mask ("from
nothing"). Infection clicks are bounded by the reference lung mask (the annotator fixes the lungs
first) and counted on COVID-19 images only (the others have no infection to outline). Reported
per mask kind, method and start: NoC@85 and NoC@90 (mean clicks until Dice >= 0.85 / 0.90, an
image that never gets there counting as ``--max-clicks``), the share of images that never get
there, and the mean Dice after 0, 1, 3 and 5 clicks. The model runs once per image (the
probability maps); a baseline click costs no forward pass. The network's time per refinement is
measured on one image at a time (one forward pass at 256², the app's case).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import settings
from inference.click_refine import Click, disk, refine
from inference.click_sim import next_click
from services.masks import dice  # per image; two empty masks agree (1.0)

if TYPE_CHECKING:  # torch loads only when the network runs
    from inference.model import LoadedModel

THRESHOLDS = (0.85, 0.90)
REPORTED_CLICKS = (0, 1, 3, 5)


def brush(mask: np.ndarray, click: Click, radius: float, within: np.ndarray | None) -> np.ndarray:
    stroke = disk(mask.shape, click.y, click.x, radius)
    if click.positive:
        return mask | (stroke & within if within is not None else stroke)
    return mask & ~stroke


@dataclass
class Trace:
    dices: list[float]  # after 0, 1, ... clicks
    seconds: list[float]  # per click (the method's own time)

    def clicks_to(self, threshold: float) -> int | None:
        """Clicks until Dice >= threshold (0: the start already is); None: never."""
        return next((n for n, d in enumerate(self.dices) if d >= threshold), None)


def simulate(
    start: np.ndarray, truth: np.ndarray, probability: np.ndarray, method: str, radius: float,
    within: np.ndarray | None, max_clicks: int,
) -> Trace:
    mask = start.copy()
    trace = Trace([dice(mask, truth)], [])
    for _ in range(max_clicks):
        if trace.dices[-1] >= max(THRESHOLDS):  # NoC@90 reached: the annotator stops
            trace.dices.append(trace.dices[-1])
            continue
        click = next_click(mask, truth)
        if click is None:
            trace.dices.append(1.0)
            continue
        t0 = time.perf_counter()
        if method == "click":
            mask = refine(mask, probability, [click], radius, within)
        else:
            mask = brush(mask, click, radius, within)
        trace.seconds.append(time.perf_counter() - t0)
        trace.dices.append(dice(mask, truth))
    return trace


def summarize(traces: list[Trace], max_clicks: int) -> dict[str, object]:
    out: dict[str, object] = {"images": len(traces)}
    for t in THRESHOLDS:
        reached = [tr.clicks_to(t) for tr in traces]
        counts = [max_clicks if r is None else r for r in reached]
        out[f"noc@{round(t * 100)}"] = round(float(np.mean(counts)), 2)
        out[f"never@{round(t * 100)}"] = round(float(np.mean([r is None for r in reached])), 4)
    dice_curve = [round(float(np.mean([tr.dices[n] for tr in traces])), 4)
                  for n in range(max_clicks + 1)]  # after 0, 1, ... clicks
    for n in REPORTED_CLICKS:
        out[f"dice@{n}"] = dice_curve[n]
    out["dice_curve"] = dice_curve
    times = [s for tr in traces for s in tr.seconds]
    out["ms_per_click_median"] = round(1000 * float(np.median(times)), 2) if times else None
    return out


def network_traces(
    click_model: LoadedModel, images: np.ndarray, truth: np.ndarray, start: np.ndarray,
    other: np.ndarray, kind: str, within: np.ndarray | None, max_clicks: int,
) -> list[Trace]:
    from training.click_eval import simulate_clicks

    run_ = simulate_clicks(click_model, images, truth, start, other, kind, max_clicks,
                           within=within, stop_at=max(THRESHOLDS), bf16=True)
    return [Trace(list(map(float, row)), []) for row in run_.dices]


def refinement_ms(click_model: LoadedModel, images: np.ndarray, repeats: int = 30) -> float:
    """Median time of one refinement of one 256² image (one forward pass, no batching)."""
    import torch

    from inference.click_model import forward_probabilities

    size = images.shape[1]
    img = torch.from_numpy(images[:1]).float().div_(255.0).unsqueeze(1)
    guidance = torch.zeros(1, 6, size, size)
    times = []
    for _ in range(repeats + 3):
        t0 = time.perf_counter()
        forward_probabilities(click_model, img, guidance, bf16=True)
        times.append(time.perf_counter() - t0)
    return round(1000 * float(np.median(times[3:])), 1)


def run(args: argparse.Namespace) -> dict[str, object]:
    from inference.model import load_checkpoint
    from training.data import CLASS_NAMES
    from training.evaluate import load_eval_split, predict_arrays
    from training.outputs import run_network

    model = load_checkpoint(args.checkpoint)
    click_model = (load_checkpoint(args.click_checkpoint)
                   if args.click_checkpoint and args.click_checkpoint.is_file() else None)
    size = model.config.input_size
    data = load_eval_split(args.data, args.split, size, args.limit, args.cache_dir)
    t0 = time.perf_counter()
    raw = run_network(model, data.images, batch_size=8, bf16=True)
    forward_s = (time.perf_counter() - t0) / max(len(data), 1)
    assert raw.lung_prob is not None and raw.infection_prob is not None
    preds = predict_arrays(model, data, batch_size=8, bf16=True)  # the app's masks
    covid = CLASS_NAMES.index("COVID-19")
    radius = 0.03 * size
    methods = ("model", "click", "brush") if click_model is not None else ("click", "brush")
    results: dict[str, object] = {}
    for kind in ("lung", "infection"):
        truths = (data.lungs if kind == "lung" else data.infections) > 0
        keep = (np.ones(len(data), bool) if kind == "lung"
                else (data.labels == covid) & truths.any((1, 2)))  # infection: COVID-19 only
        lungs = data.lungs[keep] > 0
        within = None if kind == "lung" else lungs  # the annotator fixes the lungs first
        other = preds.infections[keep] if kind == "lung" else lungs
        probs = (raw.lung_prob if kind == "lung" else raw.infection_prob)[keep]
        for start_name in ("prediction", "nothing"):
            starts = ((preds.lungs if kind == "lung" else preds.infections)[keep].copy()
                      if start_name == "prediction" else np.zeros_like(truths[keep]))
            if within is not None:
                starts &= within
            for method in methods:
                if method == "model":
                    traces = network_traces(click_model, data.images[keep], truths[keep],
                                            starts, other, kind, within, args.max_clicks)
                else:
                    traces = [simulate(starts[i], truths[keep][i],
                                       probs[i].astype(np.float32), method, radius,
                                       None if within is None else within[i], args.max_clicks)
                              for i in range(len(starts))]
                results[f"{kind}/{start_name}/{method}"] = summarize(traces, args.max_clicks)
                print(kind, start_name, method, results[f"{kind}/{start_name}/{method}"],
                      flush=True)
    out: dict[str, object] = {
        "split": args.split, "images": len(data), "limit": args.limit,
        "checkpoint_version": model.meta.get("version"), "max_clicks": args.max_clicks,
        "radius_px": radius, "size": size, "forward_ms_per_image": round(1000 * forward_s, 1),
        "results": results,
    }
    if click_model is not None:
        out["click_checkpoint_version"] = click_model.meta.get("version")
        ms = refinement_ms(click_model, data.images)
        out["click_refinement_ms"] = ms
        for key, row in results.items():  # batched in the run: one unbatched refinement each
            if key.endswith("/model") and isinstance(row, dict):
                row["ms_per_click_median"] = ms
    return out


METHOD_NAMES = {"model": "click network", "click": "click (baseline)", "brush": "brush"}


def curve(row: dict[str, Any]) -> tuple[list[int], list[float]]:
    """Mean Dice after n clicks: the whole curve when recorded, else the reported points."""
    if "dice_curve" in row:
        return list(range(len(row["dice_curve"]))), row["dice_curve"]
    return list(REPORTED_CLICKS), [row[f"dice@{n}"] for n in REPORTED_CLICKS]


def plot(summary: dict[str, Any], png: Path) -> str:
    """Mean Dice against clicks, lungs and infection side by side (plotly + kaleido)."""
    import os

    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "Lungs (all Test images)", "Infection (COVID-19 Test images)"))
    colours = {"model": "#1f77b4", "click": "#ff7f0e", "brush": "#7f7f7f"}
    for col, kind in enumerate(("lung", "infection"), start=1):
        for key, row in summary["results"].items():
            k, start, method = key.split("/")
            if k != kind:
                continue
            xs, ys = curve(row)
            from_model = start == "prediction"
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines+markers", showlegend=col == 1,
                name=f"{METHOD_NAMES[method]}, from {'the model' if from_model else 'nothing'}",
                line={"color": colours[method], "dash": "solid" if from_model else "dot"},
            ), 1, col)
        fig.update_xaxes(title_text="clicks", row=1, col=col)
        fig.update_yaxes(title_text="per-image mean Dice", range=[0, 1], row=1, col=col)
    fig.update_layout(title=f"Simulated annotator on COVID-QU-Ex {summary['split']} "
                      f"(stops at Dice 0.90)", width=1100, height=450, template="plotly_white")
    if Path("/usr/bin/chromium").exists():
        os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    fig.write_image(str(png), scale=1)
    return str(png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=settings.cli_path, default=settings.shared_data_dir())
    p.add_argument("--split", default="Val", choices=("Train", "Val", "Test"))
    p.add_argument("--checkpoint", type=settings.cli_path, default=settings.SHIPPED_CHECKPOINT)
    p.add_argument("--click-checkpoint", type=settings.cli_path,
                   default=settings.SHIPPED_CLICK_CHECKPOINT,
                   help="the click-refinement network (the model method; skipped if absent)")
    p.add_argument("--cache-dir", type=settings.cli_path, default=None)
    p.add_argument("--limit", type=int, default=0, help="only this many images (0: all)")
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path, default=None,
                   help="also draw the Dice-per-click curve as this PNG")
    p.add_argument("--plot-from", type=Path, default=None,
                   help="draw the curve of this results JSON instead of running")
    args = p.parse_args(argv)
    if args.plot_from is not None:
        print(plot(json.loads(args.plot_from.read_text()),
                   args.plot or args.plot_from.with_suffix(".png")))
        return 0
    summary = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot(summary, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
