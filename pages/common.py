"""Streamlit glue shared by the pages: cached resources, the selected study, small widgets.

Not a page itself (``app.py`` lists the pages). Caching:
- ``st.cache_resource``: the database engine (per ``DATABASE_URL``), the model (per checkpoint
  file and hash), the first-start bootstrap (once per process and database).
- ``st.cache_data``: per-image results keyed by (sha256, model version[, class]): the stored
  X-ray, the stored prediction, Grad-CAM, thumbnails. Studies and versions never change once
  stored, so these never go stale.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

import settings
from inference.loading import XRay
from inference.model import CheckpointError, LoadedModel, load_checkpoint
from services import audit_trail, correction, identity, readings, studies
from services import bootstrap as boot
from services.storage import Store, open_store

log = logging.getLogger("infmap.app")

STUDY_KEY = "infmap.study_id"
VISITED_KEY = "infmap.visited"
DISCLAIMER = settings.DECISION_SUPPORT_NOTICE


# ----------------------------------------------------------------------------- resources
@st.cache_resource(show_spinner=False)
def _store(url: str) -> Store:
    return open_store(url)


def db(write: bool = True) -> AbstractContextManager[Any]:
    """A session in one transaction on the app's database (the services' ``scope``)."""
    return _store(settings.database_url()).scope(write=write)


@st.cache_resource(show_spinner="Loading the model...", max_entries=3)
def _load_model(path: str, mtime_ns: int) -> LoadedModel:
    return load_checkpoint(path)


def load_model(path: str | Path) -> LoadedModel:
    """The network for a checkpoint file, loaded once per file version (path + mtime)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No model checkpoint at {path}.")
    return _load_model(str(path), path.stat().st_mtime_ns)


def click_network() -> LoadedModel | None:
    """The click-refinement network (issue 14), if it ships; None: the click tool falls back to
    the probability-guided baseline. Loaded once per file version."""
    path = settings.SHIPPED_CLICK_CHECKPOINT
    return load_model(path) if path.is_file() else None


@st.cache_resource(show_spinner=False)
def _bootstrap(url: str, checkpoint: str, samples: str) -> boot.BootstrapReport:
    return boot.bootstrap(db, Path(checkpoint), Path(samples), load_model)


def bootstrap() -> boot.BootstrapReport:
    with st.spinner("First start: preparing the database, the model and the sample cases..."):
        return _bootstrap(
            settings.database_url(), str(settings.checkpoint_path()), str(settings.samples_dir())
        )


def active_model() -> tuple[studies.ModelInfo | None, LoadedModel | None, str | None]:
    """(registered active version, its loaded network, a message when it is unusable)."""
    info = studies.active_model(db)
    if info is None:
        report = bootstrap()
        return None, None, report.model_message or "No model version is registered."
    try:
        return info, load_model(info.checkpoint_path), None
    except CheckpointError as exc:
        return info, None, f"The active model {info.version} cannot be loaded: {exc}"


# ----------------------------------------------------------------------------- per-image data
@st.cache_resource(show_spinner=False, max_entries=8)
def xray_for(sha256: str, image_id: int) -> XRay:
    """The stored X-ray (shared, read-only: full-size arrays are not copied on every rerun)."""
    return studies.load_xray_payload(db, image_id)


@st.cache_data(show_spinner=False, max_entries=8)
def _probability_maps(
    sha256: str, image_id: int, checkpoint: str, model_version: str
) -> dict[str, np.ndarray]:
    with st.spinner("Running the model for the click tool..."):
        return correction.probability_maps(xray_for(sha256, image_id), load_model(checkpoint))


def probability_maps(
    sha256: str, image_id: int, model: studies.ModelInfo
) -> dict[str, np.ndarray]:
    """The model's probability maps of a study (for the click tool), cached per (image sha256,
    model version)."""
    return _probability_maps(sha256, image_id, model.checkpoint_path, model.version)


class _NoPrediction(Exception):
    """Raised out of the cached function so that "no prediction" is never cached."""


@st.cache_data(show_spinner=False, max_entries=64)
def _prediction_for(
    database_url: str, sha256: str, model_version: str, image_id: int, _model: studies.ModelInfo
) -> studies.PredictionView:
    info = _model
    loaded = None
    with suppress(CheckpointError):
        loaded = load_model(info.checkpoint_path)
    with st.spinner("Running the model on this study..."):
        view = studies.prediction_for(db, image_id, info, loaded)
    if view is None:  # the checkpoint could not be loaded: try again next time
        raise _NoPrediction
    return view


def prediction_for(
    sha256: str, model_version: str, image_id: int, model: studies.ModelInfo
) -> studies.PredictionView | None:
    """The model's stored output for a study (computed and stored first if missing), cached per
    (image sha256, model version) and database; None, not cached, while there is none."""
    try:
        return _prediction_for(settings.database_url(), sha256, model_version, image_id, model)
    except _NoPrediction:
        return None


@st.cache_data(show_spinner=False, max_entries=2048)
def _summary_read(
    database_url: str, sha256: str, model_version: str | None, versions: tuple[int, ...],
    _reading: readings.Reading, _prediction: studies.PredictionView | None,
) -> studies.InfectionSummary | None:
    if _prediction is None and len(_reading) < len(settings.MASK_KINDS):
        return None
    if _prediction is None:
        masks = {kind: version_mask(v.id) for kind, v in _reading.items()}
    else:
        masks = readings.masks_read(_reading, _prediction, version_mask)
    return readings.summary_read(masks)


def summary_read(
    sha256: str,
    image_id: int,
    reading: readings.Reading,
    model: studies.ModelInfo | None,
) -> studies.InfectionSummary | None:
    """Infection % and severity of the masks readers see (human versions, else the model's),
    cached per study, model version and the versions read."""
    pred = prediction_for(sha256, model.version, image_id, model) if model is not None else None
    versions = tuple(sorted(v.id for v in reading.values()))
    return _summary_read(
        settings.database_url(), sha256, model.version if model else None, versions, reading, pred
    )


@st.cache_data(show_spinner=False, max_entries=64)
def gradcam_for(
    sha256: str, model_version: str, class_name: str, image_id: int, _checkpoint: str
) -> np.ndarray:
    return studies.gradcam_for(
        xray_for(sha256, image_id).pixels, load_model(_checkpoint), class_name
    )


@st.cache_data(show_spinner=False, max_entries=2048)
def thumbnail(sha256: str, image_id: int) -> str | None:
    try:
        return studies.thumbnail(db, image_id)
    except Exception:  # a missing payload must not break the worklist
        log.exception("thumbnail failed for image %s", image_id)
        return None


@st.cache_data(show_spinner=False, max_entries=256)
def _version_mask(database_url: str, version_id: int) -> np.ndarray:
    return studies.version_mask(db, version_id)


def version_mask(version_id: int) -> np.ndarray:
    """A saved version's mask (versions are append-only: cached for good)."""
    return _version_mask(settings.database_url(), version_id)


# ----------------------------------------------------------------------------- session
def kept(key: str) -> dict[str, Any]:
    """A plain dict in the session state for what an action with side effects leaves behind
    (the signed-in user, a save's outcome). Take it *before* the action: every access to
    ``st.session_state`` is a point where Streamlit stops a run that a newer rerun request
    (a click, the canvas reporting its size) replaces, and a stop between the database write
    and its record in the session would leave e.g. a sign-in in the audit trail and a signed-out
    page. Writes into this dict are no such point."""
    box = st.session_state.get(key)
    if not isinstance(box, dict):
        box = st.session_state[key] = {}
    return box


def identity_state() -> dict[str, Any]:
    """Where ``services.identity`` keeps this browser session's user (see :func:`kept`)."""
    return kept("infmap.identity.state")


# ----------------------------------------------------------------------------- selection
def user() -> identity.Identity | None:
    return identity.current_user(identity_state())


def audit(action: str, image_id: int | None = None, detail: str | None = None) -> None:
    """Record an action of this browser session's user in the audit trail."""
    audit_as(user(), action, image_id, detail)


def audit_as(
    who: identity.Identity | None, action: str, image_id: int | None = None,
    detail: str | None = None,
) -> None:
    """:func:`audit` with the user taken before the action (no session-state access here)."""
    audit_trail.record(db, who.user_id if who is not None else None, action, image_id, detail)


def audit_view(image_id: int, page: str) -> None:
    """A study shown: recorded once per browser session, user and study (not on every rerun)."""
    u = user()
    key = (u.user_id if u is not None else None, int(image_id))
    seen = st.session_state.setdefault("infmap.audited_views", set())
    if key not in seen:
        audit("view", image_id, page)
        seen.add(key)


def select_study(image_id: int) -> None:
    st.session_state[STUDY_KEY] = int(image_id)
    visited = st.session_state.setdefault(VISITED_KEY, [])
    if image_id not in visited:
        visited.append(int(image_id))
    st.query_params["study"] = str(image_id)


def selected_study_id() -> int | None:
    value = st.session_state.get(STUDY_KEY)
    if value is None:
        raw = st.query_params.get("study")
        if raw and raw.isdigit():
            value = int(raw)
            st.session_state[STUDY_KEY] = value
    return int(value) if value is not None else None


def study_picker(
    current: int | None, key: str, steps: dict[str, str] | None = None,
) -> studies.StudyInfo | None:
    """The selected study, with a select box to switch; None (and a hint) if there is none.
    ``steps``: also previous / next study buttons, with these keys (``previous``, ``next``)."""
    rows = studies.worklist(db)
    if not rows:
        st.info("No studies yet: upload one on the Worklist page.")
        return None
    ids = [r.image_id for r in rows]
    names = {r.image_id: r.display_name for r in rows}
    if current not in names:
        current = ids[0]
    chosen = st.selectbox(
        "Study",
        ids,
        index=ids.index(current),
        format_func=lambda i: f"#{i} · {names[i]}",
        key=key,
    )
    if steps is not None:
        study_steps(ids, chosen, key, steps)
    if chosen != st.session_state.get(STUDY_KEY):
        select_study(chosen)
    info = studies.study_info(db, chosen)
    if info is None:
        st.error("This study no longer exists.")
    return info


def study_steps(ids: list[int], current: int, key: str, shortcuts: dict[str, str]) -> None:
    """Previous / next study buttons (worklist order ``ids``) for the picker keyed ``key``."""
    if current not in ids or len(ids) < 2:
        return
    i = ids.index(current)

    def go(image_id: int) -> None:  # before the next run renders the picker
        st.session_state[key] = image_id

    prev_col, next_col, _ = st.columns([2, 2, 5])
    prev_col.button("Previous study", key=f"{key}.previous", icon=":material/arrow_back:",
                    disabled=i == 0, on_click=go, args=(ids[max(0, i - 1)],),
                    shortcut=shortcuts["previous"])  # fmt: skip
    next_col.button("Next study", key=f"{key}.next", icon=":material/arrow_forward:",
                    disabled=i == len(ids) - 1, on_click=go, args=(ids[min(len(ids) - 1, i + 1)],),
                    shortcut=shortcuts["next"])  # fmt: skip


def model_notice(message: str | None) -> None:
    if message:
        st.warning(message, icon=":material/warning:")
