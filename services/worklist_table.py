"""The worklist's rows as the page shows them, in the order of the figures shown.

Where a study has a current human version (services.readings), its infection % and severity
come from the masks readers see, not the model's; sorting on those columns uses the same
figures, so the order matches what the table says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from database.worklist import WorklistRow
from services.display import MISSING
from services.studies import DOMAIN_LABELS, STATUS_LABELS, InfectionSummary

# The sorts that depend on the shown (possibly human) figures; highest first, missing last.
# Others keep the database's order.
_SHOWN_FIGURE_SORTS = ("infection", "severity")


def worklist_records(
    rows: Sequence[WorklistRow],
    read: Mapping[int, tuple[InfectionSummary, str]] | None = None,
    sort: str | None = None,
) -> list[dict[str, Any]]:
    """Table rows for the worklist (without thumbnails, which the page caches). ``read``: per
    study with a current human version, the figures from the masks readers see and whose
    they are; the others show the model's. ``sort`` (a studies.SORTS value): "infection" and
    "severity" re-order the rows by the figures shown. Missing numbers stay None: the table
    shows them as MISSING."""
    read = read or {}
    records = []
    for r in rows:
        score = r.severity_score
        severity_text = f"{r.severity} ({score}/8)" if r.severity is not None else "not predicted"
        percent, source = r.infection_percent, "model" if r.prediction_id else ""
        if r.image_id in read:
            summary, source = read[r.image_id]
            percent, score = summary.percent, summary.severity_score
            severity_text = f"{summary.severity} ({score}/8)"
        records.append(
            {
                "id": r.image_id,
                "study": f"#{r.image_id} · {r.display_name}",
                "class": r.predicted_class or MISSING,
                "confidence": r.confidence,
                "infection %": percent,
                "severity": severity_text,
                "severity score": score,  # not a column: the severity sort's key
                "masks": source or MISSING,
                "uncertainty": r.uncertainty,
                "in domain": DOMAIN_LABELS[r.in_domain] if r.prediction_id else MISSING,
                "ood score": r.out_of_domain,
                "status": STATUS_LABELS.get(r.status, r.status),
                "last touched by": r.last_author or "",
                "last touched (UTC)": r.last_touched.strftime("%Y-%m-%d %H:%M")
                if r.last_touched
                else "",
                "added (UTC)": r.created.strftime("%Y-%m-%d %H:%M"),
            }
        )
    if sort in _SHOWN_FIGURE_SORTS:
        records.sort(key=lambda rec: _shown_figures_key(rec, sort))  # stable: ties keep order
    return records


def _shown_figures_key(rec: dict[str, Any], sort: str) -> tuple:
    percent, score = rec["infection %"], rec["severity score"]
    by_percent = (percent is None, -(percent or 0.0))
    if sort == "severity":
        return (score is None, -(score or 0), *by_percent)
    return by_percent
