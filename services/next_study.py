"""Which study to open next: a small strategy protocol (in the style of MONAI Label's
``Strategy``) over the worklist rows, so active-learning rules plug in without touching pages.

A strategy sees the worklist of the active model version and returns one row or None; ``First``
tries strategies in order. The app picks one per role (``services.studies.NEXT_STUDY``);
``DEFAULT`` is the new study the model is least sure of, else the oldest submission waiting for
a radiologist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from database.worklist import WorklistRow


class NextStudyStrategy(Protocol):
    """Pick the next study from ``rows``, skipping image ids in ``exclude``."""

    def choose(
        self, rows: Sequence[WorklistRow], exclude: Iterable[int] = ()
    ) -> WorklistRow | None: ...


def _highest_first(
    rows: Sequence[WorklistRow], key: Callable[[WorklistRow], float | None]
) -> list[WorklistRow]:
    """Highest value first, rows without a value last, ties by image id (as the worklist)."""
    return sorted(rows, key=lambda r: (key(r) is None, -(key(r) or 0.0), r.image_id))


def _pick(rows: Iterable[WorklistRow], exclude: Iterable[int]) -> WorklistRow | None:
    skip = set(exclude)
    return next((r for r in rows if r.image_id not in skip), None)


@dataclass(frozen=True)
class MostUncertain:
    """Uncertainty sampling: the study with ``status`` whose prediction is least sure."""

    status: str = "new"

    def choose(
        self, rows: Sequence[WorklistRow], exclude: Iterable[int] = ()
    ) -> WorklistRow | None:
        wanted = [r for r in rows if r.status == self.status]
        return _pick(_highest_first(wanted, lambda r: r.uncertainty), exclude)


@dataclass(frozen=True)
class ReviewQueue:
    """The oldest study waiting with ``status`` (default: submitted, for a radiologist)."""

    status: str = "submitted"

    def choose(
        self, rows: Sequence[WorklistRow], exclude: Iterable[int] = ()
    ) -> WorklistRow | None:
        wanted = sorted(
            (r for r in rows if r.status == self.status), key=lambda r: (r.created, r.image_id)
        )
        return _pick(wanted, exclude)


@dataclass(frozen=True)
class OutOfDomainFirst:
    """The study furthest from the training data first (``WorklistRow.out_of_domain``, higher
    is further). Until an out-of-domain score is stored every row has None and this chooses
    nothing, so in a ``First`` chain the next strategy decides."""

    status: str = "new"

    def choose(
        self, rows: Sequence[WorklistRow], exclude: Iterable[int] = ()
    ) -> WorklistRow | None:
        scored = [r for r in rows if r.status == self.status and r.out_of_domain is not None]
        return _pick(_highest_first(scored, lambda r: r.out_of_domain), exclude)


@dataclass(frozen=True)
class First:
    """The first of ``strategies`` that chooses a study."""

    strategies: tuple[NextStudyStrategy, ...]

    def choose(
        self, rows: Sequence[WorklistRow], exclude: Iterable[int] = ()
    ) -> WorklistRow | None:
        skip = set(exclude)
        for strategy in self.strategies:
            row = strategy.choose(rows, skip)
            if row is not None:
                return row
        return None


DEFAULT: NextStudyStrategy = First((MostUncertain("new"), ReviewQueue("submitted")))
