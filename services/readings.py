"""What readers see: the current human version of each mask, and the figures derived from it.

Per (study, mask kind) the current human version is the newest approved one, else the newest
submitted one (a later "sent back" vetoes either, as for fine-tuning); drafts are the author's
own work in progress and are not shown to readers. Where there is none, the model's mask is the
reading. Infection % and severity are recomputed from the masks read, so the worklist and Review
show the figures of what was approved, not the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from database import annotation_versions
from services.ingest import SessionFactory
from services.studies import InfectionSummary, PredictionView, infection_summary
from settings import MASK_KINDS

STATUS_WORDS = {"approved": "approved", "submitted": "submitted, awaiting approval"}


@dataclass(frozen=True)
class HumanVersion:
    id: int
    kind: str
    status: str  # approved | submitted
    author: str
    author_role: str
    created: datetime

    def describe(self) -> str:
        when = self.created.strftime("%Y-%m-%d %H:%M UTC")
        return (
            f"{STATUS_WORDS.get(self.status, self.status)} · version {self.id} by "
            f"{self.author} ({self.author_role}), {when}"
        )


Reading = dict[str, HumanVersion]  # mask kind -> its current human version (absent: model)


def current_versions(scope: SessionFactory) -> dict[int, Reading]:
    """Per study id, the current human version of each mask kind that has one."""
    found: dict[int, Reading] = {}
    with scope(write=False) as session:
        # submitted first, then approved on top: approved wins where both exist
        for status in ("submitted", "approved"):
            for v in annotation_versions.training_annotations(session, statuses=(status,)):
                found.setdefault(v.image_id, {})[v.kind] = HumanVersion(
                    v.id, v.kind, v.status, v.author.name, v.author.role, v.created
                )
    return found


def reading_for(scope: SessionFactory, image_id: int) -> Reading:
    return current_versions(scope).get(image_id, {})


def masks_read(
    reading: Reading, prediction: PredictionView, version_mask: Callable[[int], np.ndarray]
) -> dict[str, np.ndarray]:
    """The mask of each kind readers see: the human version's (``version_mask(id)``), else
    the model's."""
    model = {"lung": prediction.lung_mask, "infection": prediction.infection_mask}
    return {
        kind: version_mask(reading[kind].id) if kind in reading else model[kind]
        for kind in MASK_KINDS
    }


def summary_read(masks: dict[str, np.ndarray]) -> InfectionSummary:
    return infection_summary(masks["lung"], masks["infection"])


def source_label(reading: Reading) -> str:
    """One word for a worklist column: whose masks the figures come from."""
    if not reading:
        return "model"
    statuses = {v.status for v in reading.values()}
    word = {frozenset({"approved"}): "approved", frozenset({"submitted"}): "submitted"}.get(
        frozenset(statuses), "partly approved"
    )
    authors = sorted({v.author for v in reading.values()})
    return f"{word} · {', '.join(authors)}"
