"""Fit the post-hoc decisions of a checkpoint on COVID-QU-Ex Val (and the OOD reference on Train)
and write them into the checkpoint (:class:`inference.calibration.Calibration`).

    python -m training.calibrate --data ../shared/data/covid-qu-ex --checkpoint runs/best.pt \\
        --out models/infmap.pt

Only Train and Val are read: Test stays for the one final evaluation, external data is never
used. What is fitted, and how:
- temperature T: minimises the Val negative log-likelihood of softmax(logits / T);
- COVID-19 rule: COVID-19 when p(COVID-19) >= t, else the likelier other class; t maximises
  min(sensitivity, specificity) of COVID-19 against the rest on Val (the balanced point);
- lung clean-up (two largest components, holes filled): kept if it raises the Val per-image
  mean lung Dice;
- infection threshold: of 0.10, 0.15, ..., 0.90, the one with the highest Val per-image mean
  infection Dice on COVID-19 images among those that give at most 10% of the Val Non-COVID and
  Normal images a severity grade (either lung >= 1% infected; the lowest such share when no
  threshold gets there): a healthy X-ray graded "mild" is an error, and maximising Dice alone
  took recipe 2.1 to the grid's lowest threshold, grading over half of them;
- out-of-domain reference (:mod:`inference.calibration`): for the content features, mean, top-256
  principal axes and Ledoit-Wolf precision (in that span) of the Train embeddings (no
  augmentation); for the acquisition statistics, mean and Ledoit-Wolf precision; each distance
  divided by its Val 95th percentile, the score their maximum, the threshold its Val 95th
  percentile, so 95% of in-distribution images pass.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

import settings
from inference.calibration import (
    Calibration,
    clean_lung_mask,
    decide,
    mahalanobis,
    ood_scores,
)
from inference.model import load_checkpoint, save_checkpoint
from training.data import load_split
from training.eval_metrics import graded_share
from training.metrics import dice_iou_per_image
from training.outputs import RawOutputs, run_network

INFECTION_GRID = tuple(round(x, 2) for x in np.arange(0.10, 0.901, 0.05))
GRADED_LIMIT = 0.10  # most of the Val lesion-free images the infection threshold may grade
OOD_PASS_RATE = 0.95
OOD_COMPONENTS = 256


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the NLL (LBFGS on log T, from T = 1)."""
    lg = torch.from_numpy(logits).double()
    y = torch.from_numpy(labels).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lg / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def balanced_covid_threshold(p_covid: np.ndarray, is_covid: np.ndarray) -> tuple[float, dict]:
    """t maximising min(sensitivity, specificity); ties go to the higher sum of the two, then
    to the t nearest 0.5."""
    n_pos, n_neg = max(1, int(is_covid.sum())), max(1, int((~is_covid).sum()))

    def rates(t: float) -> tuple[float, float]:
        pos = p_covid >= t
        return (float((pos & is_covid).sum() / n_pos), float((~pos & ~is_covid).sum() / n_neg))

    candidates = np.unique(np.concatenate([p_covid, [0.5]])).tolist()
    best = max(candidates, key=lambda t: (min(rates(t)), sum(rates(t)), -abs(t - 0.5)))
    sens, spec = rates(best)
    return float(best), {"sensitivity": sens, "specificity": spec}


def _mean_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(dice_iou_per_image(pred, gt)[0].mean())


def choose_masks(val: RawOutputs, lungs_gt: np.ndarray, inf_gt: np.ndarray,
                 covid: np.ndarray) -> tuple[bool, float, dict[str, Any]]:
    assert val.lung_prob is not None and val.infection_prob is not None
    lung_prob = val.lung_prob.astype(np.float32)
    inf_prob = val.infection_prob.astype(np.float32)
    scores: dict[str, Any] = {}
    raw = lung_prob > 0.5
    scores["lung_dice_raw"] = _mean_dice(raw, lungs_gt)
    cleaned = np.stack([clean_lung_mask(lung) for lung in raw])
    scores["lung_dice_cleaned"] = _mean_dice(cleaned, lungs_gt)
    clean = scores["lung_dice_cleaned"] > scores["lung_dice_raw"]
    lungs = cleaned if clean else raw
    per_t, graded = {}, {}
    for t in INFECTION_GRID:
        pred = (inf_prob > t) & lungs
        per_t[t] = _mean_dice(pred[covid], inf_gt[covid])
        graded[t] = graded_share(lungs[~covid], pred[~covid]) or 0.0
    allowed = [t for t in INFECTION_GRID if graded[t] <= GRADED_LIMIT]
    if allowed:
        best_t = max(allowed, key=lambda t: (per_t[t], -abs(t - 0.5)))
    else:
        best_t = min(INFECTION_GRID, key=lambda t: (graded[t], -per_t[t]))
    scores["infection_dice_by_threshold"] = {str(k): v for k, v in per_t.items()}
    scores["graded_without_lesion_by_threshold"] = {str(k): v for k, v in graded.items()}
    scores["graded_limit"] = GRADED_LIMIT
    return clean, float(best_t), scores


def fit_mahalanobis(
    train: np.ndarray, components: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, Any]]:
    """Mean, projection (top principal axes; None: all dimensions) and Ledoit-Wolf precision."""
    x = train.astype(np.float64)
    mean = x.mean(0)
    notes: dict[str, Any] = {"dim": int(x.shape[1])}
    projection = None
    z = x - mean
    if components is not None:
        k = min(components, len(x) - 1, x.shape[1])
        pca = PCA(n_components=k, svd_solver="full").fit(z)
        z = z @ pca.components_.T
        projection = torch.from_numpy(pca.components_.T.astype(np.float32).copy())
        notes.update(components=int(k),
                     explained_variance=float(pca.explained_variance_ratio_.sum()))
    lw = LedoitWolf(assume_centered=True).fit(z)
    notes["shrinkage"] = float(lw.shrinkage_)
    return (torch.from_numpy(mean.astype(np.float32)), projection,
            torch.from_numpy(lw.precision_.astype(np.float32)), notes)


def fit_ood(
    train_emb: np.ndarray, val_emb: np.ndarray, content_dims: int | None = None,
    components: int = OOD_COMPONENTS,
) -> tuple[Calibration, dict[str, Any]]:
    """Both OOD distances (content: the first ``content_dims`` columns, in PCA span;
    acquisition: the rest, full rank), each scaled by its Val 95th percentile, and the combined
    threshold at the Val 95th percentile. ``content_dims=None``: content only."""
    content_dims = train_emb.shape[1] if content_dims is None else content_dims
    mean, proj, prec, content_notes = fit_mahalanobis(train_emb[:, :content_dims], components)
    cal = Calibration(ood_mean=mean, ood_projection=proj, ood_precision=prec)
    notes: dict[str, Any] = {"train_images": len(train_emb), "val_pass_rate": OOD_PASS_RATE,
                             "content": content_notes}
    val = torch.from_numpy(val_emb)
    content_val = ood_scores(val, cal)  # unscaled: ood_scale is still 1
    assert content_val is not None
    cal.ood_scale = float(np.quantile(content_val, OOD_PASS_RATE))
    if content_dims < train_emb.shape[1]:
        s_mean, _, s_prec, style_notes = fit_mahalanobis(train_emb[:, content_dims:])
        style_val = mahalanobis(val[:, content_dims:], s_mean, s_prec).double().numpy()
        cal.style_mean, cal.style_precision = s_mean, s_prec
        cal.style_scale = float(np.quantile(style_val, OOD_PASS_RATE))
        notes["acquisition"] = style_notes
    val_scores = ood_scores(val, cal)
    assert val_scores is not None
    cal.ood_threshold = float(np.quantile(val_scores, OOD_PASS_RATE))
    notes.update(content_scale=cal.ood_scale, acquisition_scale=cal.style_scale,
                 threshold=cal.ood_threshold)
    return cal, notes


def calibrate(args: argparse.Namespace) -> Calibration:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.checkpoint)
    size = loaded.config.input_size
    train = load_split(args.data, "Train", size, args.cache_dir)
    val = load_split(args.data, "Val", size, args.cache_dir)
    if args.limit:
        train = train.subset(np.arange(0, len(train), max(1, len(train) // args.limit)))
        val = val.subset(np.arange(0, len(val), max(1, len(val) // args.limit)))
    val_out = run_network(loaded, val.images, keep_maps=True, progress=args.progress)
    if args.ood_train_limit and args.ood_train_limit < len(train):
        # evenly spaced: Train is sorted by class, so every class keeps its share
        train = train.subset(np.unique(
            np.linspace(0, len(train) - 1, args.ood_train_limit).round().astype(int)))
    train_out = run_network(loaded, train.images, keep_maps=False, progress=args.progress)

    cal, ood_notes = fit_ood(train_out.embedding, val_out.embedding,
                             content_dims=loaded.model.content_dims)
    cal.temperature = fit_temperature(val_out.logits, val.labels)
    probs = torch.softmax(torch.from_numpy(val_out.logits) / cal.temperature, 1).numpy()
    covid_idx = list(loaded.config.class_names).index("COVID-19")
    is_covid = val.labels == covid_idx
    cal.covid_threshold, rule_val = balanced_covid_threshold(probs[:, covid_idx], is_covid)
    cal.clean_lungs, cal.infection_threshold, mask_notes = choose_masks(
        val_out, val.lungs > 0, val.infections > 0, is_covid)
    accuracy = float((decide(probs, cal, covid_idx) == val.labels).mean())
    cal.notes = {
        "fitted_on": "COVID-QU-Ex Val (decisions), Train (out-of-domain reference)",
        "val_images": len(val), "temperature": cal.temperature,
        "covid_rule_val": rule_val, "val_accuracy_with_rule": accuracy,
        "masks": mask_notes, "ood": ood_notes,
    }
    meta = dict(loaded.meta)
    if args.version:  # new decisions on the same weights are a new model version
        meta["version"] = args.version
    meta["calibration"] = cal.notes
    save_checkpoint(loaded.model, args.out, meta=meta, half=True, calibration=cal)
    return cal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=settings.cli_path_str, required=True,
                   help="COVID-QU-Ex root folder")
    p.add_argument("--checkpoint", type=settings.cli_path_str, required=True,
                   help="trained checkpoint to calibrate")
    p.add_argument("--out", type=settings.cli_path_str, required=True,
                   help="where to write the calibrated checkpoint")
    p.add_argument("--cache-dir", type=settings.cli_path_str, default=".cache/covid-qu-ex")
    p.add_argument("--limit", type=int, default=0, help="about N images per split (tests)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ood-train-limit", type=int, default=0,
                   help="fit the out-of-domain reference on N evenly spaced Train images (0: all)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--version", default="", help="version of the written checkpoint (default: "
                   "the input's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    cal = calibrate(parse_args(argv))
    print(json.dumps(cal.notes, indent=1, default=str))


if __name__ == "__main__":
    main()
