"""Worklist queries: every study with its prediction and review status, filtered and sorted in
SQL (missing values last), and the next study to look at.

Every function takes a Session; the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from database.model_versions import get_active_model_version
from database.models import AnnotationVersion, Image, Prediction, User

WORKLIST_STATUSES: tuple[str, ...] = ("new", "corrected", "submitted", "approved", "returned")
WORKLIST_SORTS: tuple[str, ...] = (
    "created",
    "oldest",
    "uncertainty",
    "infection",
    "confidence",
    "severity",
    "last_touched",
    "name",
    "out_of_domain",
)
# Filter on the out-of-domain flag: in domain, out of domain, not scored (no score stored).
DOMAIN_FILTERS: tuple[str, ...] = ("in", "out", "unscored")


@dataclass(frozen=True)
class WorklistRow:
    image_id: int
    sha256: str  # content hash: the key the app caches thumbnails by
    display_name: str
    source: str
    created: datetime
    prediction_id: int | None
    predicted_class: str | None
    confidence: float | None
    infection_percent: float | None
    severity: str | None
    severity_score: int | None
    uncertainty: float | None
    status: str  # new | corrected | submitted | approved | returned
    last_author: str | None
    last_touched: datetime | None
    out_of_domain: float | None = None  # the out-of-domain score: higher is further from Train
    in_domain: bool | None = None  # score within the Val threshold; None: not scored


def derive_status(newest_status: str | None) -> str:
    """Worklist status from the newest non-conflict version over both kinds."""
    if newest_status is None:
        return "new"
    return "corrected" if newest_status == "draft" else newest_status


def _order_by(sort: str) -> list[Any]:
    desc_last = lambda c: c.desc().nulls_last()  # noqa: E731 - highest first, missing last
    asc_last = lambda c: c.asc().nulls_last()  # noqa: E731
    orders: dict[str, list[Any]] = {
        "created": [Image.created.desc(), Image.id.desc()],
        "oldest": [Image.created.asc(), Image.id.asc()],
        "uncertainty": [desc_last(Prediction.uncertainty), Image.id],
        "infection": [desc_last(Prediction.infection_percent), Image.id],
        "confidence": [asc_last(Prediction.confidence), Image.id],
        "severity": [
            desc_last(Prediction.severity_score),
            desc_last(Prediction.infection_percent),
            Image.id,
        ],
        "last_touched": [desc_last(AnnotationVersion.created), Image.id],
        "out_of_domain": [desc_last(Prediction.ood_score), Image.id],
        "name": [Image.id],  # re-sorted by casefold() below: SQL lower() is ASCII-only in SQLite
    }
    return orders[sort]


def worklist(
    session: Session,
    status: str | Iterable[str] | None = None,
    predicted_class: str | None = None,
    sort: str = "created",
    model_version_id: int | None = None,
    domain: str | Iterable[str] | None = None,
) -> list[WorklistRow]:
    """Every image with its prediction (by ``model_version_id``, default the active version) and
    review status.

    Sorts: created (newest first), oldest, uncertainty / infection / severity / out_of_domain
    (highest first), confidence (lowest first), last_touched (newest first), name. Missing
    values sort last. ``domain``: any of ``DOMAIN_FILTERS`` ("unscored" includes studies
    without a prediction).
    """
    if sort not in WORKLIST_SORTS:
        raise ValueError(f"sort must be one of {', '.join(WORKLIST_SORTS)}, not {sort!r}")
    domains: set[str] | None = None
    if domain is not None:
        domains = {domain} if isinstance(domain, str) else set(domain)
        if domains - set(DOMAIN_FILTERS):
            raise ValueError(f"domain must be among {', '.join(DOMAIN_FILTERS)}")
    wanted: set[str] | None = None
    if status is not None:
        wanted = {status} if isinstance(status, str) else set(status)
        if wanted - set(WORKLIST_STATUSES):
            raise ValueError(f"unknown worklist status in {sorted(wanted)}")
    if model_version_id is None:
        active = get_active_model_version(session)
        model_version_id = active.id if active is not None else -1
    newest = (
        select(AnnotationVersion.image_id, func.max(AnnotationVersion.id).label("vid"))
        .where(AnnotationVersion.conflict.is_(False))
        .group_by(AnnotationVersion.image_id)
        .subquery()
    )
    derived = case(
        (AnnotationVersion.status.is_(None), "new"),
        (AnnotationVersion.status == "draft", "corrected"),
        else_=AnnotationVersion.status,
    )
    stmt = (
        select(
            Image.id,
            Image.sha256,
            Image.display_name,
            Image.source,
            Image.created,
            Prediction.id,
            Prediction.predicted_class,
            Prediction.confidence,
            Prediction.infection_percent,
            Prediction.severity,
            Prediction.severity_score,
            Prediction.uncertainty,
            AnnotationVersion.status,
            User.name,
            AnnotationVersion.created,
            Prediction.ood_score,
            Prediction.in_domain,
        )
        .outerjoin(
            Prediction,
            and_(Prediction.image_id == Image.id, Prediction.model_version_id == model_version_id),
        )
        .outerjoin(newest, newest.c.image_id == Image.id)
        .outerjoin(AnnotationVersion, AnnotationVersion.id == newest.c.vid)
        .outerjoin(User, User.id == AnnotationVersion.author_id)
        .order_by(*_order_by(sort))
    )
    if predicted_class is not None:
        stmt = stmt.where(Prediction.predicted_class == predicted_class)
    if wanted is not None:
        stmt = stmt.where(derived.in_(sorted(wanted)))
    if domains is not None:
        flag = {
            "in": Prediction.in_domain.is_(True),
            "out": Prediction.in_domain.is_(False),
            "unscored": Prediction.in_domain.is_(None),
        }
        stmt = stmt.where(or_(*(flag[d] for d in sorted(domains))))
    rows = [
        WorklistRow(
            image_id=r[0],
            sha256=r[1],
            display_name=r[2],
            source=r[3],
            created=r[4],
            prediction_id=r[5],
            predicted_class=r[6],
            confidence=r[7],
            infection_percent=r[8],
            severity=r[9],
            severity_score=r[10],
            uncertainty=r[11],
            status=derive_status(r[12]),
            last_author=r[13],
            last_touched=r[14],
            out_of_domain=r[15],
            in_domain=r[16],
        )
        for r in session.execute(stmt)
    ]
    if sort == "name":
        rows.sort(key=lambda r: (r.display_name.casefold(), r.image_id))
    return rows


def next_to_review(
    session: Session,
    by: str = "oldest",
    status: str | Iterable[str] = "new",
    model_version_id: int | None = None,
    exclude: Iterable[int] = (),
) -> WorklistRow | None:
    """The next image to look at: the oldest with ``status`` (default ``new``), or with
    ``by="uncertainty"`` the one the model is least sure of. ``exclude``: image ids to skip."""
    if by not in ("oldest", "uncertainty"):
        raise ValueError("by must be 'oldest' or 'uncertainty'")
    skip = set(exclude)
    for row in worklist(session, status=status, sort=by, model_version_id=model_version_id):
        if row.image_id not in skip:
            return row
    return None
