"""Model versions: registered checkpoints, exactly one active once any exists, lineage.

Registering and activating take turns (``serialize_writers``): on PostgreSQL two replicas
activating at once would otherwise both clear the old active row and the second would then hit
the one-active index; two registering the same version would both insert it.

Every function takes a Session; the caller owns the transaction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from database.models import ModelVersion
from database.session import serialize_writers


def lock_registry(session: Session) -> None:
    """Take the registry's turn until the transaction ends: call it before reading what a
    registration or activation decision depends on (``training.finetune`` checks the active
    version is still its base)."""
    serialize_writers(session, "model_versions")


def register_model_version(
    session: Session,
    version: str,
    checkpoint_path: str | Path,
    sha256: str | None,
    metrics: dict[str, Any] | None = None,
    parent: ModelVersion | int | None = None,
    lineage: dict[str, Any] | None = None,
    train_minutes: float | None = None,
    activate: bool = False,
) -> ModelVersion:
    """Record a checkpoint. Re-registering the same version with the same hash returns it.

    The first version registered while none is active becomes active, so that once any version
    exists exactly one is active.
    """
    lock_registry(session)
    existing = get_model_version(session, version)
    if existing is not None:
        if sha256 and existing.checkpoint_sha256 and existing.checkpoint_sha256 != sha256:
            raise ValueError(f"model version {version!r} is already registered with another file")
        row = existing
    else:
        parent_id = parent.id if isinstance(parent, ModelVersion) else parent
        row = ModelVersion(
            version=version,
            checkpoint_path=str(checkpoint_path),
            checkpoint_sha256=sha256,
            parent_id=parent_id,
            lineage=dict(lineage or {}),
            metrics=dict(metrics or {}),
            train_minutes=train_minutes,
            active=False,
        )
        session.add(row)
        session.flush()
    if activate or get_active_model_version(session) is None:
        set_active_model_version(session, row.id)
    return row


def get_model_version(session: Session, version: str) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.version == version))


def get_model_version_by_sha256(session: Session, sha256: str) -> ModelVersion | None:
    """The version registered for a checkpoint file with these bytes, if any."""
    return session.scalar(
        select(ModelVersion).where(ModelVersion.checkpoint_sha256 == sha256).limit(1)
    )


def get_active_model_version(session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.active.is_(True)))


def set_active_model_version(session: Session, model_version_id: int) -> ModelVersion:
    """Make one version the active one (rolling back = activating an older version)."""
    lock_registry(session)
    row = session.get(ModelVersion, model_version_id)
    if row is None:
        raise LookupError(f"no model version {model_version_id}")
    # Two statements: clearing first keeps the one-active unique index satisfied throughout.
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.active.is_(True), ModelVersion.id != model_version_id)
        .values(active=False)
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.id == model_version_id)
        .values(active=True)
        .execution_options(synchronize_session="fetch")
    )
    session.flush()
    return row


def list_model_versions(session: Session) -> list[ModelVersion]:
    """Newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))

