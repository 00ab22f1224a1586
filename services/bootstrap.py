"""First start: the shipped model version and the bundled sample cases.

Idempotent and cheap when already done: a model version is registered only if no version has
this checkpoint's hash; samples already stored (same bytes) and already predicted are skipped.
Without any checkpoint the app still starts (the samples are stored without predictions) and the
report says why there is no model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from database import images, model_versions
from database.models import ModelVersion
from inference.model import CheckpointError, LoadedModel, file_sha256
from services.datastore import FolderSource, ingest_source
from services.ingest import IngestOutcome, ModelHandle, SessionFactory

log = logging.getLogger(__name__)



@dataclass
class BootstrapReport:
    model_version: str | None = None
    model_registered: bool = False
    model_message: str | None = None  # why there is no usable model, for the user
    samples_found: int = 0
    samples_added: int = 0
    sample_errors: list[str] = field(default_factory=list)


def version_name(model: LoadedModel, sha256: str) -> str:
    """The version from the checkpoint's metadata, or one derived from its hash."""
    version = model.meta.get("version")
    return str(version) if version else f"unversioned-{sha256[:12]}"


def register_checkpoint(
    scope: SessionFactory, path: Path, load_model: Callable[[Path], LoadedModel]
) -> tuple[ModelVersion, bool]:
    """Register ``path`` as a model version unless a version with its hash exists, and make a
    newly registered one active. Returns (version row, newly registered)."""
    sha = file_sha256(path)
    with scope(write=False) as session:
        known = model_versions.get_model_version_by_sha256(session, sha)
    if known is not None:
        return known, False
    model = load_model(path)
    name = version_name(model, sha)
    meta = model.meta
    with scope() as session:
        existing = model_versions.get_model_version(session, name)
        if existing is not None and existing.checkpoint_sha256 not in (None, sha):
            name = f"{name}+{sha[:8]}"  # same version string, different weights
        row = model_versions.register_model_version(
            session,
            name,
            str(path),
            sha,
            metrics=meta.get("metrics") if isinstance(meta.get("metrics"), dict) else None,
            lineage={"source": "bootstrap", "meta_version": meta.get("version")},
            activate=True,
        )
    log.info("registered model version %s", name)
    return row, True


def sample_files(samples_dir: Path) -> list[Path]:
    """X-ray files under ``samples_dir``, skipping their masks (sorted, deterministic)."""
    return FolderSource(samples_dir).files()


def import_samples(
    scope: SessionFactory, samples_dir: Path, models: list[ModelHandle]
) -> list[IngestOutcome]:
    return ingest_source(scope, FolderSource(samples_dir, source="sample"), models)


def bootstrap(
    scope: SessionFactory,
    checkpoint: Path,
    samples_dir: Path,
    load_model: Callable[[Path], LoadedModel],
) -> BootstrapReport:
    """Register ``checkpoint`` if new, then import the samples with the active model."""
    report = BootstrapReport()
    with scope(write=False) as session:
        removed = images.remove_stale_temp_payloads(session)
    if removed:
        log.info("removed %d unfinished payload file(s) of an interrupted write", removed)
    if checkpoint.is_file():
        try:
            row, report.model_registered = register_checkpoint(scope, checkpoint, load_model)
        except (CheckpointError, ValueError) as exc:
            report.model_message = f"The model checkpoint could not be registered: {exc}"
        else:
            log.debug("checkpoint is model version %s", row.version)
    handle = None
    with scope(write=False) as session:
        active = model_versions.get_active_model_version(session)
    if active is not None:
        report.model_version = active.version
        try:
            handle = ModelHandle(
                active.id, active.version, load_model(Path(active.checkpoint_path))
            )
        except CheckpointError as exc:
            report.model_message = f"The active model {active.version} cannot be loaded: {exc}"
    elif report.model_message is None:
        report.model_message = (
            f"No model checkpoint at {checkpoint}. Studies can be stored and browsed, but there "
            "are no predictions until a model is available (set INFMAP_CHECKPOINT or add "
            "models/infmap.pt and restart)."
        )
    outcomes = import_samples(scope, samples_dir, [handle] if handle else [])
    report.samples_found = len(outcomes)
    report.samples_added = sum(1 for o in outcomes if o.ok and o.created)
    report.sample_errors = [f"{o.name}: {o.error}" for o in outcomes if not o.ok]
    return report
