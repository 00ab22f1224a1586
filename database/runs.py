"""Fine-tuning runs: queued -> running (progress, pid) -> succeeded | failed | interrupted.

Every function takes a Session; the caller owns the transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from database.models import FinetuneRun, utcnow

FINISHED_RUN_STATUSES: tuple[str, ...] = ("succeeded", "failed", "interrupted")


def create_run(session: Session, args: dict[str, Any] | None = None) -> FinetuneRun:
    run = FinetuneRun(status="queued", progress=0.0, args=dict(args or {}))
    session.add(run)
    session.flush()
    return run


def _unfinished_run(session: Session, run_id: int) -> FinetuneRun:
    """The run, which must not be finished (``ValueError``: the caller stops too)."""
    run = _get_run(session, run_id)
    if run.status in FINISHED_RUN_STATUSES:
        raise ValueError(f"fine-tune run {run_id} already {run.status}")
    return run


def _get_run(session: Session, run_id: int) -> FinetuneRun:
    run = session.get(FinetuneRun, run_id)
    if run is None:
        raise LookupError(f"no fine-tune run {run_id}")
    return run


def update_run_progress(
    session: Session,
    run_id: int,
    progress: float,
    message: str | None = None,
    pid: int | None = None,
    host: str | None = None,
) -> FinetuneRun:
    """Record progress (0..1) and a heartbeat; the first update marks the run running and
    started."""
    run = _unfinished_run(session, run_id)
    if run.status == "queued":
        run.status = "running"
        run.started = utcnow()
    run.progress = min(1.0, max(0.0, float(progress)))
    run.heartbeat = utcnow()
    if message is not None:
        run.message = message
    if pid is not None:
        run.pid = pid
    if host is not None:
        run.host = host
    session.flush()
    return run


def beat(session: Session, run_id: int) -> bool:
    """The run is alive: record the time. Returns whether someone asked it to stop; raises
    ``ValueError`` if it was marked finished meanwhile (so it stops too)."""
    run = _unfinished_run(session, run_id)
    run.heartbeat = utcnow()
    session.flush()
    return bool(run.stop_requested)


def request_stop(session: Session, run_id: int) -> FinetuneRun:
    """Ask a run to stop; the run acts on it at its next heartbeat, wherever it runs."""
    run = _get_run(session, run_id)
    if run.status not in FINISHED_RUN_STATUSES:
        run.stop_requested = True
        session.flush()
    return run


def finish_run(
    session: Session,
    run_id: int,
    status: str,
    message: str | None = None,
    model_version_id: int | None = None,
) -> FinetuneRun:
    if status not in FINISHED_RUN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(FINISHED_RUN_STATUSES)}")
    run = _get_run(session, run_id)
    run.status = status
    run.finished = utcnow()
    if run.started is None:
        run.started = run.finished
    if status == "succeeded":
        run.progress = 1.0
    if message is not None:
        run.message = message
    if model_version_id is not None:
        run.model_version_id = model_version_id
    session.flush()
    return run


def get_run(session: Session, run_id: int) -> FinetuneRun | None:
    return session.get(FinetuneRun, run_id)


def list_runs(session: Session, limit: int | None = 50) -> list[FinetuneRun]:
    """Newest first."""
    stmt = select(FinetuneRun).order_by(FinetuneRun.id.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt))
