"""What the Models page does: versions and runs to show, activation, re-prediction, fine-tuning.

The page only draws; everything that touches the database, the model files or processes is
here. Activation of a version the fine-tuning gate rejected needs the caller to confirm the
gate's reason. After an activation, the studies the new version has not seen are re-predicted
in a background thread of the server process (``start_repredict``) whose progress the pages
poll (``repredict_progress``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from database import annotation_versions, audit, model_versions, reading_versions, runs, users
from database.session import data_dir_for
from database.versioning import RoleError
from inference.model import LoadedModel
from services import ingest, studies
from services.identity import MODEL_MANAGERS
from services.ingest import SessionFactory
from settings import READING_CLASSES
from training import run_control

log = logging.getLogger("infmap.models")

MANAGERS = MODEL_MANAGERS  # who may start fine-tuning and change the model
RUN_STATUS_LABELS = {
    "queued": "queued",
    "running": "running",
    "succeeded": "finished",
    "failed": "failed",
    "interrupted": "stopped",
}


def can_manage(role: str | None) -> bool:
    return role in MANAGERS


def _dice(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None


# ----------------------------------------------------------------------------- reading
def version_records(scope: SessionFactory) -> list[dict[str, Any]]:
    """Every model version, oldest first, with the figures the page shows."""
    with scope(write=False) as s:
        rows = model_versions.list_model_versions(s)
        names = {r.id: r.version for r in rows}
        out = []
        for r in reversed(rows):
            m, lin = dict(r.metrics or {}), dict(r.lineage or {})
            val, corr = m.get("val") or {}, m.get("corrections") or {}
            base_corr = (m.get("base") or {}).get("corrections") or {}
            decision = m.get("decision") or {}
            out.append({
                "id": r.id, "version": r.version, "active": bool(r.active),
                "parent": names.get(r.parent_id, "") if r.parent_id is not None else "",
                "parent_id": r.parent_id,
                "created": r.created, "train_minutes": r.train_minutes,
                "val_lung": _dice(val.get("lung_dice")),
                "val_infection": _dice(val.get("infection_dice_covid")),
                "val_n": val.get("n_images"),
                "held_score": _dice(corr.get("score")),
                "held_score_base": _dice(base_corr.get("score")),
                "held_n": corr.get("n_images"),
                "held_accuracy": corr.get("reading_accuracy"),
                "held_accuracy_base": base_corr.get("reading_accuracy"),
                "held_ece": corr.get("reading_ece"),
                "held_ece_base": base_corr.get("reading_ece"),
                "readings": len(lin.get("reading_version_ids") or []),
                "annotations": len(lin.get("annotation_version_ids") or []),
                "data_hash": (lin.get("data_hash") or "")[:12],
                "decision": decision.get("reason") or lin.get("source") or "",
                "rejected": decision.get("activate") is False,
                "checkpoint": r.checkpoint_path, "lineage": lin, "metrics": m,
            })  # fmt: skip
        return out


def rejection_reason(record: dict[str, Any]) -> str | None:
    """Why the fine-tuning gate did not activate this version (None: it was not rejected)."""
    if not record.get("rejected"):
        return None
    return record.get("decision") or "the fine-tuning gate rejected it"


def corrections_available(scope: SessionFactory) -> tuple[int, int]:
    """(studies, annotation versions) that a fine-tuning run would use now."""
    with scope(write=False) as s:
        versions = annotation_versions.training_annotations(s)
        return len({v.image_id for v in versions}), len(versions)


def readings_available(scope: SessionFactory) -> int:
    """Studies whose submitted or approved reading a fine-tuning run would learn as a class."""
    with scope(write=False) as s:
        return sum(v.label in READING_CLASSES for v in reading_versions.training_readings(s))


def run_records(scope: SessionFactory, limit: int = 10) -> list[dict[str, Any]]:
    with scope(write=False) as s:
        return [{
            "id": r.id, "status": r.status, "progress": float(r.progress or 0.0),
            "message": r.message or "", "pid": r.pid, "host": r.host,
            "heartbeat": r.heartbeat, "stop_requested": bool(r.stop_requested),
            "created": r.created, "started": r.started, "finished": r.finished,
            "model_version": r.model_version.version if r.model_version else "",
        } for r in runs.list_runs(s, limit=limit)]  # fmt: skip


# A run on another machine is judged by its heartbeat (every run_control.HEARTBEAT_SECONDS):
# this many seconds of silence, several missed beats, and it is taken for gone.
REMOTE_SILENCE_SECONDS = 90.0


def runs_here(run: dict[str, Any]) -> bool:
    """Whether the run's process is on this machine (runs recorded before hosts were: yes)."""
    return run.get("host") in (None, run_control.this_host())


def is_stale(run: dict[str, Any]) -> bool:
    """A run the database calls running whose process is gone (killed, machine restarted).
    On this machine the process id says so; on another, a heartbeat that stopped."""
    if run["status"] not in ("queued", "running"):
        return False
    now = datetime.now(UTC)
    if run["status"] == "queued" and run["pid"] is None:  # never picked up within a minute
        return (now - run["created"]).total_seconds() > 60
    if runs_here(run):
        return not run_control.process_alive(run["pid"])
    last = run.get("heartbeat") or run["created"]
    return (now - last).total_seconds() > REMOTE_SILENCE_SECONDS


def is_finished(run: dict[str, Any]) -> bool:
    return run["status"] in runs.FINISHED_RUN_STATUSES


# ----------------------------------------------------------------------------- activation
@dataclass(frozen=True)
class Activation:
    ok: bool
    message: str
    needs_confirmation: str | None = None  # the gate's reason, to be confirmed first


def activate(
    scope: SessionFactory, record: dict[str, Any], user_id: int,
    confirmed_rejection: bool = False,
) -> Activation:  # fmt: skip
    """Make ``record``'s version the active one (researchers and admins only); a gate-rejected
    version only once the caller confirmed the gate's reason."""
    with scope(write=False) as s:
        try:
            users.acting_user(s, user_id, MANAGERS, "activate or roll back a model version")
        except (RoleError, LookupError) as exc:
            return Activation(False, str(exc))
    if not Path(record["checkpoint"]).is_file():
        return Activation(False, "This version's model file is missing; it cannot be activated.")
    reason = rejection_reason(record)
    if reason is not None and not confirmed_rejection:
        return Activation(False, "", needs_confirmation=reason)
    with scope() as s:
        user = users.acting_user(s, user_id, MANAGERS, "activate or roll back a model version")
        model_versions.set_active_model_version(s, record["id"])
        audit.record(s, "model activate", user, detail=f"version {record['version']}"
                     + (" (gate rejection confirmed)" if reason is not None else ""))
    return Activation(True, f"{record['version']} is now the active model.")


# ----------------------------------------------------------------------------- re-prediction
@dataclass
class Repredict:
    version: str
    total: int
    done: int = 0
    failed: int = 0
    finished: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)


_REPREDICT: dict[str, Repredict] = {}  # per database URL, the latest background re-prediction
_LOCK = threading.Lock()


def missing_predictions(scope: SessionFactory) -> tuple[int, list[int]]:
    """(studies, ids of those without a prediction from the active version)."""
    rows = studies.worklist(scope)
    return len(rows), [r.image_id for r in rows if r.prediction_id is None]


def _repredict(scope: SessionFactory, job: Repredict, handle: ingest.ModelHandle,
               image_ids: list[int]) -> None:  # fmt: skip
    for image_id in image_ids:
        try:
            xray = studies.load_xray_payload(scope, image_id)
            ingest.ensure_prediction(scope, image_id, xray, handle)
        except Exception:  # one broken payload must not stop the rest
            log.exception("re-predict failed for image %s", image_id)
            job.failed += 1
        job.done += 1
    job.finished = True


def start_repredict(
    scope: SessionFactory, database_url: str, model: studies.ModelInfo, loaded: LoadedModel,
    user_id: int,
) -> Repredict | None:
    """Predict, in a background thread, every study the active version has not seen. One job
    per database at a time; returns the running job (None: nothing to do). Researchers and
    admins only (``RoleError`` otherwise)."""
    with scope(write=False) as s:
        users.acting_user(s, user_id, MANAGERS, "re-predict the worklist")
    with _LOCK:
        job = _REPREDICT.get(database_url)
        if job is not None and not job.finished:
            return job
        _, missing = missing_predictions(scope)
        if not missing:
            return None
        job = Repredict(model.version, len(missing))
        handle = ingest.ModelHandle(model.id, model.version, loaded)
        job.thread = threading.Thread(
            target=_repredict, args=(scope, job, handle, missing), daemon=True,
            name=f"repredict-{model.version}",
        )  # fmt: skip
        _REPREDICT[database_url] = job
        job.thread.start()
        return job


def repredict_progress(database_url: str) -> Repredict | None:
    return _REPREDICT.get(database_url)


# ----------------------------------------------------------------------------- fine-tuning
_CHILDREN: dict[int, Any] = {}  # Popen objects of runs this server started, reaped when done


def reap() -> None:
    for run_id, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            _CHILDREN.pop(run_id, None)


@dataclass(frozen=True)
class StartOutcome:
    ok: bool
    run_id: int | None
    message: str


def start_finetune(
    scope: SessionFactory, database_url: str, user_id: int, steps: int, replay_ratio: float,
    seed: int, tolerance: float, data: str | None,
) -> StartOutcome:  # fmt: skip
    """Register a run and start ``training.finetune`` for it as a background process
    (researchers and admins only)."""
    try:
        with scope() as s:
            user = users.acting_user(s, user_id, MANAGERS, "start fine-tuning")
            args = {"steps": steps, "replay_ratio": replay_ratio, "seed": seed,
                    "tolerance": tolerance, "data": data or None, "by": user.name}  # fmt: skip
            run_id = int(runs.create_run(s, args).id)
            audit.record(s, "model start", user, detail=f"fine-tuning run {run_id}")
    except (RoleError, LookupError) as exc:
        return StartOutcome(False, None, str(exc))
    folder = data_dir_for(database_url) / "models"
    folder.mkdir(parents=True, exist_ok=True)
    extra = ["--steps", str(steps), "--replay-ratio", str(replay_ratio),
             "--seed", str(seed), "--tolerance", str(tolerance), "--onnx"]  # fmt: skip
    if data:
        extra += ["--data", data]
    try:
        proc = run_control.launch_background(
            database_url, run_id, folder / f"finetune-run{run_id}.pt", extra,
            log_path=folder / f"finetune-run{run_id}.log",
        )  # fmt: skip
    except OSError as exc:
        log.exception("could not start fine-tuning run %s", run_id)
        with scope() as s:
            runs.finish_run(s, run_id, "failed", message=f"could not start: {exc}")
        return StartOutcome(False, run_id, "The fine-tuning process could not be started.")
    _CHILDREN[run_id] = proc
    return StartOutcome(True, run_id, f"Fine-tuning run {run_id} started in the background.")


def stop_run(scope: SessionFactory, run: dict[str, Any], user_id: int) -> None:
    """Ask a run to stop, wherever it runs: recorded in its row, which the run reads at its
    next heartbeat; on this machine it is also sent SIGTERM at once. It marks itself stopped
    and registers nothing. Researchers and admins only (``RoleError`` otherwise)."""
    with scope() as s:
        users.acting_user(s, user_id, MANAGERS, "stop a fine-tuning run")
        runs.request_stop(s, int(run["id"]))  # any server may ask; the run acts on it
    if run.get("pid") and runs_here(run):  # here: at once (a pid means nothing elsewhere)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(run["pid"]), signal.SIGTERM)


def mark_interrupted(scope: SessionFactory, run_id: int, user_id: int) -> None:
    """Record a run that stopped without reporting as interrupted (researchers and admins)."""
    with scope() as s:
        users.acting_user(s, user_id, MANAGERS, "mark a fine-tuning run as stopped")
        runs.finish_run(s, run_id, "interrupted", message="stopped without reporting")


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s/:'\"]+){2,}")


def user_message(message: str) -> str:
    """A run's message as people should read it: no signal names, no server file paths."""
    text = re.sub(r"interrupted \(SIG\w+\)", "stopped on request", message or "")
    text = re.sub(r"\bSIG(TERM|INT|KILL)\b", "a stop request", text)
    return _PATH.sub(lambda m: Path(m.group(0)).name, text)
