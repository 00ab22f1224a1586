"""Tables (SQLAlchemy 2.0 typed declarative models).

Enumerated columns are plain strings with named CHECK constraints, so the schema reads the same
in SQLite, PostgreSQL and the Alembic migration. Times are stored as UTC and come back aware.
Annotation versions are append-only: their masks are never updated and no version is deleted;
the one change is ``annotation_versions.submit_draft`` turning the head draft's status to submitted
(``reading_versions.submit_reading_draft`` for readings).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from settings import MASK_KINDS, READING_LABELS, ROLES

IMAGE_SOURCES: tuple[str, ...] = ("upload", "sample", "import")
ANNOTATION_STATUSES: tuple[str, ...] = ("draft", "submitted", "approved", "returned")
REVIEW_STATUSES: tuple[str, ...] = ("approved", "returned")  # radiologists only
RUN_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "interrupted")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC (SQLite has no time zones) and returns aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    # argon2id hash (database.users); None: an account from before log-in, not usable until an
    # admin sets a password.
    password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def __repr__(self) -> str:
        return f"User(id={self.id}, role={self.role!r})"


class Image(Base):
    """One study: the de-identified payload lives in the file store, content-addressed."""

    __tablename__ = "images"
    __table_args__ = (CheckConstraint(_in("source", IMAGE_SOURCES), name="source"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)  # of the original file bytes
    payload_path: Mapped[str] = mapped_column(String(255))  # relative to the data directory
    payload_sha256: Mapped[str] = mapped_column(String(64))  # of the stored .npz bytes
    display_name: Mapped[str] = mapped_column(String(255))  # user-given file name: never log it
    source: Mapped[str] = mapped_column(String(16))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)

    predictions: Mapped[list[Prediction]] = relationship(back_populates="image")

    def __repr__(self) -> str:  # no display name: it may identify a patient
        return f"Image(id={self.id}, sha256={self.sha256[:12]}...)"


class ModelVersion(Base):
    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(120), unique=True)
    checkpoint_path: Mapped[str] = mapped_column(String(1024))
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    train_minutes: Mapped[float | None] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])


# At most one active model version, enforced by the database itself (partial unique index).
Index(
    "uq_model_versions_one_active",
    ModelVersion.active,
    unique=True,
    sqlite_where=text("active"),
    postgresql_where=text("active"),
)


class Prediction(Base):
    """The model's output for one image under one model version (predicted once per version)."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version_id", name="uq_predictions_image_model"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    predicted_class: Mapped[str] = mapped_column(String(32))
    confidence: Mapped[float] = mapped_column(Float)
    lung_mask_png: Mapped[bytes] = mapped_column(LargeBinary)
    infection_mask_png: Mapped[bytes] = mapped_column(LargeBinary)
    infection_percent: Mapped[float] = mapped_column(Float)
    infection_percent_left: Mapped[float] = mapped_column(Float)
    infection_percent_right: Mapped[float] = mapped_column(Float)
    severity: Mapped[str] = mapped_column(String(32))
    severity_score: Mapped[int] = mapped_column(Integer)
    uncertainty: Mapped[float] = mapped_column(Float)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The out-of-domain score and flag (inference.calibration); NULL: not scored (a checkpoint
    # without an out-of-domain reference, or stored before revision 0003).
    ood_score: Mapped[float | None] = mapped_column(Float, default=None)
    in_domain: Mapped[bool | None] = mapped_column(Boolean, default=None)

    image: Mapped[Image] = relationship(back_populates="predictions")
    model_version: Mapped[ModelVersion] = relationship()


class AnnotationVersion(Base):
    """One saved human mask. Append-only: never updated, never deleted.

    ``parent_id`` is the version it was drawn on (None: the first human version, drawn on top of
    the model's mask from ``prediction_id``). ``conflict`` marks a refused save kept as a draft.
    """

    __tablename__ = "annotation_versions"
    __table_args__ = (
        CheckConstraint(_in("kind", MASK_KINDS), name="kind"),
        CheckConstraint(_in("status", ANNOTATION_STATUSES), name="status"),
        Index("ix_annotation_versions_image_kind", "image_id", "kind", "conflict", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    kind: Mapped[str] = mapped_column(String(16))
    mask_png: Mapped[bytes] = mapped_column(LargeBinary)
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("annotation_versions.id"))
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("predictions.id"))
    conflict: Mapped[bool] = mapped_column(Boolean, default=False)
    comment: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    author: Mapped[User] = relationship(lazy="joined")
    parent: Mapped[AnnotationVersion | None] = relationship(remote_side=[id])
    image: Mapped[Image] = relationship()
    prediction: Mapped[Prediction | None] = relationship()

    def __repr__(self) -> str:
        return (
            f"AnnotationVersion(id={self.id}, image_id={self.image_id}, kind={self.kind!r}, "
            f"status={self.status!r}, parent_id={self.parent_id}, conflict={self.conflict})"
        )


class ReadingVersion(Base):
    """One saved reading of a study (its label and free-text finding). Append-only like
    ``AnnotationVersion``, with the same statuses, parent chain and conflict drafts."""

    __tablename__ = "reading_versions"
    __table_args__ = (
        CheckConstraint(_in("label", READING_LABELS), name="label"),
        CheckConstraint(_in("status", ANNOTATION_STATUSES), name="status"),
        Index("ix_reading_versions_image", "image_id", "conflict", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    label: Mapped[str] = mapped_column(String(32))
    finding: Mapped[str | None] = mapped_column(Text)
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("reading_versions.id"))
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("predictions.id"))
    conflict: Mapped[bool] = mapped_column(Boolean, default=False)
    comment: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    author: Mapped[User] = relationship(lazy="joined")
    parent: Mapped[ReadingVersion | None] = relationship(remote_side=[id])
    image: Mapped[Image] = relationship()

    def __repr__(self) -> str:  # no finding: free text may identify a patient
        return (
            f"ReadingVersion(id={self.id}, image_id={self.image_id}, label={self.label!r}, "
            f"status={self.status!r}, parent_id={self.parent_id}, conflict={self.conflict})"
        )


class FinetuneRun(Base):
    __tablename__ = "finetune_runs"
    __table_args__ = (
        CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)
    # Where the process runs and when it last said so: a pid means nothing on another machine.
    host: Mapped[str | None] = mapped_column(String(255))
    heartbeat: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set by an app server (any machine), acted on by the run itself at its next heartbeat.
    stop_requested: Mapped[bool] = mapped_column(Boolean, default=False,
                                                 server_default=text("false"))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime())

    model_version: Mapped[ModelVersion | None] = relationship()


AUDIT_ACTIONS: tuple[str, ...] = (
    "sign-in", "sign-in refused", "sign-out", "view", "save", "submit", "approve", "send back",
    "import", "export", "model start", "model activate", "user create", "password reset",
)  # fmt: skip


class AuditEvent(Base):
    """Who did what when. Append-only: the ORM refuses updates and deletes, and so does the
    database itself (triggers from the migration)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        CheckConstraint(_in("action", AUDIT_ACTIONS), name="action"),
        Index("ix_audit_events_at", "at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    user_name: Mapped[str] = mapped_column(String(120))  # as typed for a refused sign-in
    action: Mapped[str] = mapped_column(String(32))
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"))
    detail: Mapped[str | None] = mapped_column(Text)  # never a file name or patient data

    def __repr__(self) -> str:
        return f"AuditEvent(id={self.id}, action={self.action!r}, user_id={self.user_id})"


@event.listens_for(AuditEvent, "before_update")
@event.listens_for(AuditEvent, "before_delete")
def _refuse_audit_change(mapper: Any, connection: Any, target: Any) -> None:
    raise RuntimeError("audit events are append-only")


@event.listens_for(AnnotationVersion, "before_update")
@event.listens_for(ReadingVersion, "before_update")
def _refuse_update(mapper: Any, connection: Any, target: Any) -> None:
    raise RuntimeError("annotation versions are append-only: save a new version instead")


@event.listens_for(AnnotationVersion, "before_delete")
@event.listens_for(ReadingVersion, "before_delete")
def _refuse_delete(mapper: Any, connection: Any, target: Any) -> None:
    raise RuntimeError("annotation versions are append-only and are never deleted")
