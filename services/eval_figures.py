"""Plotly figures of one evaluation (``training.evaluate.evaluate_set``'s metrics and curves),
for the Evaluation page, and their PNG export through kaleido when it is installed.

The numbers come from the metrics dict only, so the figures show exactly what
``metrics.json`` / ``curves.json`` hold.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import plotly.graph_objects as go

from inference.model import CLASS_NAMES
from services.display import CLASS_COLORS

HEIGHT = 360
PNG_ATTEMPTS = 2  # kaleido's headless Chromium sometimes loses a start-up race; once more is enough

log = logging.getLogger(__name__)


def per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    cls = metrics["classification"]
    return [
        {"class": name, **cls["per_class"][name], "ROC AUC": cls["roc_auc"].get(name)}
        for name in CLASS_NAMES
    ]


def summary_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline numbers, one per row (None where the set cannot say)."""
    cls, lungs = metrics["classification"], metrics["lungs"]
    infection = metrics["infection"]["covid"] or {}
    domain = metrics.get("domain") or {}
    rows = [
        ("images", metrics["n_images"]),
        ("3-class accuracy (shipped rule)", cls["accuracy"]),
        ("macro F1", cls["macro_f1"]),
        ("COVID-19 sensitivity", cls["covid_sensitivity"]),
        ("COVID-19 specificity", cls["covid_specificity"]),
        ("AUROC COVID-19 vs rest", cls["roc_auc"].get("COVID-19")),
        (f"ECE ({cls['ece_bins']} bins)", cls["ece"]),
        ("lung Dice, per-image mean", lungs["dice_mean"]),
        ("infection Dice on COVID-19, per-image mean", infection.get("dice_mean")),
        ("share in domain", domain.get("pass_rate")),
        ("accuracy in domain", domain.get("accuracy_in_domain")),
    ]
    return [{"metric": k, "value": None if v is None else round(float(v), 4)} for k, v in rows]


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, height=HEIGHT, margin={"l": 50, "r": 20, "t": 50, "b": 50},
                      xaxis_title=x, yaxis_title=y)
    return fig


def confusion_figure(metrics: dict[str, Any]) -> go.Figure:
    cm = metrics["classification"]["confusion_matrix"]
    totals = [max(sum(row), 1) for row in cm]
    share = [[v / t for v in row] for row, t in zip(cm, totals, strict=True)]
    text = [[f"{v}<br>{s:.0%}" for v, s in zip(row, srow, strict=True)]
            for row, srow in zip(cm, share, strict=True)]
    fig = go.Figure(go.Heatmap(z=share, x=CLASS_NAMES, y=CLASS_NAMES, text=text,
                               texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
                               showscale=False,
                               hovertemplate="true %{y}, called %{x}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Confusion matrix (rows: true class)", "predicted", "true")


def roc_figure(metrics: dict[str, Any]) -> go.Figure:
    fig = go.Figure()
    for name, points in metrics["curves"]["roc"].items():
        if points is None:
            continue
        auc = metrics["classification"]["roc_auc"].get(name)
        fig.add_trace(go.Scatter(x=points["fpr"], y=points["tpr"], mode="lines",
                                 name=f"{name} (AUC {auc:.3f})",
                                 line={"color": CLASS_COLORS.get(name)}))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line={"dash": "dot", "color": "grey"}))
    return _layout(fig, "ROC, one class against the rest", "false positive rate",
                   "true positive rate")


def reliability_figure(metrics: dict[str, Any]) -> go.Figure:
    rel = metrics["classification"]["reliability"]
    edges = rel["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    kept = [(c, a, n) for c, a, n in zip(centres, rel["accuracy"], rel["count"], strict=True)
            if a is not None]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=[k[0] for k in kept], y=[k[1] for k in kept], name="accuracy",
                         width=(edges[1] - edges[0]) * 0.9, customdata=[k[2] for k in kept],
                         hovertemplate="confidence %{x:.2f}: accuracy %{y:.2f} "
                         "(%{customdata} images)<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line={"dash": "dot", "color": "grey"}))
    ece = metrics["classification"]["ece"]
    return _layout(fig, f"Reliability (ECE {ece:.3f})", "confidence (top class)", "accuracy")


def dice_figure(metrics: dict[str, Any]) -> go.Figure:
    fig = go.Figure()
    curves = metrics["curves"]
    bins = {"start": 0.0, "end": 1.0001, "size": 0.05}
    fig.add_trace(go.Histogram(x=curves["lung_dice"], xbins=bins, name="lungs (all images)",
                               opacity=0.7))
    if curves["infection_dice_covid"] is not None:
        fig.add_trace(go.Histogram(x=curves["infection_dice_covid"], xbins=bins,
                                   name="infection (COVID-19 images)", opacity=0.7))
    fig.update_layout(barmode="overlay")
    return _layout(fig, "Per-image Dice", "Dice", "images")


def risk_coverage_figure(metrics: dict[str, Any]) -> go.Figure:
    fig = go.Figure()
    rc = metrics["curves"]["risk_coverage"]
    for key, label in (("by_ood_score", "most in-domain first"),
                       ("by_confidence", "most confident first")):
        if rc.get(key) is None:
            continue
        fig.add_trace(go.Scatter(x=rc[key]["coverage"], y=rc[key]["accuracy"], mode="lines",
                                 name=label))
    fig.update_xaxes(range=[0, 1])
    return _layout(fig, "Risk-coverage: accuracy on the images kept", "coverage (share kept)",
                   "accuracy")


FIGURES = {
    "confusion_matrix": confusion_figure,
    "roc": roc_figure,
    "reliability": reliability_figure,
    "dice_histograms": dice_figure,
    "risk_coverage": risk_coverage_figure,
}


def all_figures(metrics: dict[str, Any]) -> dict[str, go.Figure]:
    return {name: make(metrics) for name, make in FIGURES.items()}


def png_export_available() -> bool:
    """PNG needs kaleido (not a requirement of the app); without it the page offers JSON."""
    return importlib.util.find_spec("kaleido") is not None


def figure_png(fig: go.Figure) -> bytes | None:
    """The figure as PNG; None without kaleido or when it fails, so the page offers the figure's
    JSON instead of failing. kaleido drives a headless Chromium, which on a busy machine can be
    asked to draw before its page script has loaded ("kaleido_scopes is not defined")."""
    if not png_export_available():
        return None
    for attempt in range(1, PNG_ATTEMPTS + 1):
        try:
            return fig.to_image(format="png", width=900, height=HEIGHT, scale=1)
        except Exception as exc:  # kaleido's own error types vary by version and browser
            log.warning("PNG export failed (attempt %d of %d): %s", attempt, PNG_ATTEMPTS,
                        type(exc).__name__)
    return None
