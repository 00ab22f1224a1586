"""The correction page's work without Streamlit: the edit in progress per (study, mask kind),
what a press of a save button does, and the words the page shows for versions and outcomes.

An edit (``Work``) is drawn on a head version (``parent``, what ``services.studies.save_mask``
checks for concurrent saves) and started from a mask (``base``: the model's mask or a saved
version); its undo/redo history is ``services.editing.MaskEdits``. Saved masks are read through
the ``version_mask`` callable the page passes (its cached reader).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services import studies
from services.editing import MaskEdits
from services.ingest import SessionFactory
from services.masks import View
from services.text import fmt_time

MODEL = "model"  # the base of an edit started from the model's mask
VersionMask = Callable[[int], np.ndarray]


@dataclass
class Work:
    parent: int | None  # the head this edit is drawn on (None: no human version yet)
    base: int | str  # MODEL or a version id: the mask the edit started from
    nonce: int = 0  # bumped by every action that outdates the last message
    canvas: int = 0  # bumped to give the canvas an empty drawing layer
    view: View = field(default_factory=View)  # what part of the image the canvas shows
    edits: MaskEdits | None = None  # None until the base mask has been read

    @classmethod
    def on(cls, head: studies.VersionInfo | None) -> Work:
        """A new edit of the head (or of the model's mask when there is no human version)."""
        return cls(parent=head.id if head else None, base=head.id if head else MODEL)

    def restart(self, parent: int | None, base: int | str) -> None:
        """Start a new edit from ``base`` (its history is dropped)."""
        self.parent, self.base, self.nonce, self.edits = parent, base, self.nonce + 1, None
        self.canvas += 1

    def base_label(self) -> str:
        return "the model's mask" if self.base == MODEL else f"version {self.base}"

    def base_mask(self, model_mask: np.ndarray, version_mask: VersionMask) -> np.ndarray:
        return model_mask if self.base == MODEL else version_mask(int(self.base))

    def edits_for(self, model_mask: np.ndarray, version_mask: VersionMask) -> MaskEdits:
        if self.edits is None:
            self.edits = MaskEdits.starting_from(self.base_mask(model_mask, version_mask))
        return self.edits


@dataclass(frozen=True)
class Note:
    """The outcome of an action, shown under the save buttons: ``kind`` is success, info or
    error; ``conflict`` the conflict draft a refused save was kept as."""

    kind: str
    text: str
    nonce: int
    conflict: int | None = None

    def outdated(self, work: Work, drawing: bool) -> bool:
        """A success lasts until the user draws again, an error until the next action on this
        canvas; a refused save (conflict draft) until the user resolves it."""
        if self.conflict is not None:
            return False
        return self.nonce != work.nonce or (self.kind == "success" and drawing)


def save_edit(
    scope: SessionFactory,
    image_id: int,
    kind: str,
    work: Work,
    edited: np.ndarray,
    changed: bool,
    head: studies.VersionInfo | None,
    user_id: int,
    status: str,
    comment: str,
    prediction_id: int,
) -> Note:
    """Save a version (or, for an unchanged head, record the review or the submission) and say
    how it went. The edit history is kept: undo still works after a save. An edit begun before
    any human version (``parent`` None) while one now exists is saved, so it is refused as
    stale and kept as a conflict draft."""
    unchanged_head = not changed and head is not None
    if unchanged_head and status != "draft" and work.parent is not None:
        outcome = studies.change_status(
            scope, image_id, kind, user_id, status, work.parent, comment
        )
    elif unchanged_head and status == "draft":
        assert head is not None
        work.nonce += 1
        return Note("info", f"Nothing to save: the mask is version {head.id} as it is.", work.nonce)
    else:
        if status == "returned" and not (comment or "").strip():
            return Note(
                "error", "Say what needs changing: a comment is required to send back.",
                work.nonce,
            )  # fmt: skip
        outcome = studies.save_mask(
            scope, image_id, kind, edited, user_id, status, work.parent, comment, prediction_id
        )
    work.nonce += 1
    if outcome.ok:
        work.parent = outcome.version_id
        return Note("success", outcome.message, work.nonce)
    return Note("error", outcome.message, work.nonce, conflict=outcome.version_id)


def current_mask(
    scope: SessionFactory,
    image_id: int,
    kind: str,
    pred: studies.PredictionView,
    version_mask: VersionMask,
) -> np.ndarray:
    """The current mask of ``kind``: its latest human version, else the model's."""
    head = studies.head_version(scope, image_id, kind)
    if head is not None:
        return version_mask(head.id)
    return pred.lung_mask if kind == "lung" else pred.infection_mask


def version_label(option: int | str, by_id: dict[int, studies.VersionInfo]) -> str:
    """A history entry as the version picker names it (``MODEL`` or a version id)."""
    if option == MODEL:
        return "Model's mask"
    v = by_id[int(option)]
    extra = " · conflict draft" if v.conflict else ""
    status = studies.STATUS_LABELS.get(v.status, v.status)  # "sent back", not "returned"
    return f"Version {v.id} · {status}{extra} · {v.author} · {fmt_time(v.created)}"


def approved_lock(
    can_edit: bool, head: studies.VersionInfo | None, revising: int | None
) -> bool:
    """An approved mask is what readers see: changing it is a revision that is reviewed again,
    started on purpose (``revising`` names the head the user chose to revise), not by a stray
    stroke."""
    return can_edit and head is not None and head.status == "approved" and revising != head.id


# ----------------------------------------------------------------------------- click tool
CLICK_RADIUS = 0.03  # of the mask's longer side: the disk a baseline click corrects at least


def probability_maps(xray: Any, model: Any) -> dict[str, np.ndarray]:
    """The model's lung and infection probability maps for a study (original grid), which the
    click tool spreads its corrections along (``inference.click_refine``)."""
    from inference.predict import predict

    p = predict(xray, model)
    return {"lung": p.lung_probability, "infection": p.infection_probability}


def click_at(
    strokes: np.ndarray, shape: tuple[int, int], view: View | None = None,
) -> tuple[int, int, bool] | None:
    """Where on the mask grid (``shape``) the canvas's click mark is, the canvas showing
    ``view``'s window of it, and whether it adds (the add colour) or removes; None without a
    mark."""
    from services.masks import stroke_layers

    add, erase = stroke_layers(strokes)
    positive = bool(add.sum() >= erase.sum())
    layer = add if positive else erase
    if not layer.any():
        return None
    ys_win, xs_win = (view or View()).window(shape)
    wh, ww = ys_win.stop - ys_win.start, xs_win.stop - xs_win.start
    ys, xs = np.nonzero(layer)
    y = ys_win.start + min(wh - 1, int((ys.mean() + 0.5) * wh / layer.shape[0]))
    x = xs_win.start + min(ww - 1, int((xs.mean() + 0.5) * ww / layer.shape[1]))
    return y, x, positive


def apply_click(
    edits: MaskEdits, strokes: np.ndarray, kind: str, other: np.ndarray,
    within: np.ndarray | None, pixels: np.ndarray, network: Any | None,
    probability: Callable[[], np.ndarray], view: View | None = None,
) -> bool:
    """Commit the click marked on the canvas into ``edits``; False without a mark or change.

    With the click-refinement network (``network``, ``inference.click_model``) the mask is
    redrawn from the X-ray, every click of this edit so far and the current masks (``other``:
    the other kind's). Without it, the probability-guided baseline spreads the click along the
    ordinary model's map (``probability``, computed only then). The click is kept with the new
    state, so undo takes it back from the network too."""
    from inference.click_model import KINDS, refine_mask
    from inference.click_refine import Click, refine

    current = edits.current()
    found = click_at(strokes, current.shape, view)
    if found is None:
        return False
    y, x, positive = found
    marks = (*edits.current_clicks(), (y, x, positive))
    if network is not None:
        other_kind = KINDS[1 - KINDS.index(kind)]
        new = refine_mask(network, pixels, kind, [Click(*m) for m in marks],
                          {kind: current, other_kind: other}, within)
    else:
        radius = CLICK_RADIUS * max(current.shape)
        new = refine(current, probability(), [Click(y, x, positive)], radius, within)
    return edits.apply(new, clicks=marks)
