"""Correction: edit the lung or infection mask on the X-ray, save versions, review them.

The canvas shows the X-ray with the mask being edited composited underneath; strokes in the add
colour add, strokes in the erase colour remove (services.masks). What is being edited lives in
the session state per (study, mask kind), so it survives leaving the page: the
``services.correction.Work`` with the version it is drawn on (``parent``, what the repository
checks for concurrent saves), the mask it started from (``base``: the model's mask or a saved
version) and the edit history (services.editing). What a save button does is
``services.correction.save_edit``.

Every shape the canvas sends is committed into that history at once and the canvas gets a fresh
key (an empty drawing layer over the new mask), so undo, redo and clear are this page's own
buttons and what the canvas shows is always the mask that is previewed, scored and saved.
"""

from __future__ import annotations

import numpy as np
import streamlit as st
from PIL import Image
from streamlit_drawable_canvas import st_canvas

from inference.overlay import INFECTION_COLOR, LUNG_COLOR
from pages import common
from services import display, identity, masks, studies
from services.correction import (
    MODEL,
    Note,
    Work,
    apply_click,
    approved_lock,
    current_mask,
    save_edit,
    version_label,
)
from services.text import fmt_time, md_escape

WORK = "correction.work"
FLASH = "correction.flash"
KEPT_KIND = "correction.kept_kind"  # the mask choice, kept while other pages are open
# Keyboard shortcuts (Ctrl is Cmd on a Mac; Streamlit shows each on its button), listed on the page.
SHORTCUTS = {"undo": "Ctrl+Z", "redo": "Ctrl+Shift+Z", "draft": "Ctrl+S", "submitted": "Ctrl+Enter",
             "next": "N", "previous": "Shift+N"}
TOOL = "correction.tool"
TOOLS = {
    "Brush: add": ("freedraw", masks.ADD_COLOR),
    "Brush: erase": ("freedraw", masks.ERASE_COLOR),
    "Polygon: add": ("polygon", masks.ADD_COLOR),
    "Polygon: erase": ("polygon", masks.ERASE_COLOR),
    # A click marks a wrong pixel; the click-refinement network redraws the mask around the
    # clicks (the probability-guided baseline where the network does not ship).
    "Click: add": ("point", masks.ADD_COLOR),
    "Click: remove": ("point", masks.ERASE_COLOR),
}
# One letter per tool, Shift for its erasing twin (Streamlit ignores them while typing in a field).
TOOL_KEYS = {"Brush: add": "B", "Brush: erase": "Shift+B", "Polygon: add": "P",
             "Polygon: erase": "Shift+P", "Click: add": "K", "Click: remove": "Shift+K"}
# Pan with W/A/S/D, not the arrows: an arrow key also moves the focused radio (the mask choice).
VIEW_KEYS = {"in": "I", "out": "O", "left": "A", "right": "D", "up": "W", "down": "S", "fit": "F"}
KEYS_HELP = (
    "Keys: B / Shift+B brush add / erase, P / Shift+P polygon add / erase, K / Shift+K click "
    "add / remove; I / O zoom in / out, W / A / S / D pan up / left / down / right, F whole "
    "image; Ctrl+Z undo, Ctrl+Shift+Z redo, Ctrl+S save draft, Ctrl+Enter submit for review; "
    "N / Shift+N next / previous study (Cmd for Ctrl on a Mac). Letter keys act when no field "
    "or choice has the focus: click the canvas or the page first."
)


def tool_slug(tool: str) -> str:
    """``"Polygon: erase"`` -> ``"polygon-erase"`` (the canvas key's tool part)."""
    return tool.lower().replace(": ", "-")


def view_slug(view: masks.View) -> str:
    return f"view-{view.zoom}-{view.cy:.4f}-{view.cx:.4f}".replace(".", "_")


def tool_buttons() -> str:
    """The drawing tools as buttons with their keys; returns the chosen tool."""
    tool = st.session_state.get(TOOL)
    if tool not in TOOLS:
        tool = st.session_state[TOOL] = "Brush: add"

    def choose(name: str) -> None:
        st.session_state[TOOL] = name

    st.markdown("**Tool**")
    for col, name in zip(st.columns(len(TOOLS)), TOOLS, strict=True):
        col.button(name, key=f"correction.tool.{tool_slug(name)}", on_click=choose, args=(name,),
                   type="primary" if name == tool else "secondary", shortcut=TOOL_KEYS[name],
                   width="stretch")  # fmt: skip
    return tool


def view_controls(work: Work, shape: tuple[int, int]) -> None:
    """Zoom and pan buttons (with keys) for the canvas of ``work``, and where it is."""
    view = work.view

    def set_view(new: masks.View) -> None:
        work.view = new

    cols = st.columns(7)
    moves = (("Zoom in", "in", view.zoomed(1), ":material/zoom_in:", view.zoom == masks.ZOOMS[-1]),
             ("Zoom out", "out", view.zoomed(-1), ":material/zoom_out:", view.zoom == 1),
             ("Left", "left", view.panned(0, -1, shape), ":material/arrow_left:", view.zoom == 1),
             ("Right", "right", view.panned(0, 1, shape), ":material/arrow_right:",
              view.zoom == 1),
             ("Up", "up", view.panned(-1, 0, shape), ":material/arrow_drop_up:", view.zoom == 1),
             ("Down", "down", view.panned(1, 0, shape), ":material/arrow_drop_down:",
              view.zoom == 1),
             ("Fit", "fit", masks.View(), ":material/fit_screen:", view.zoom == 1))
    for col, (label, name, new, icon, disabled) in zip(cols, moves, strict=True):
        col.button(label, key=f"correction.zoom.{name}", icon=icon, disabled=disabled,
                   on_click=set_view, args=(new,), shortcut=VIEW_KEYS[name],
                   help=f"{label} ({VIEW_KEYS[name]})")  # fmt: skip
    st.caption(f"Showing {view.describe(shape)}; strokes edit the mask at the image's "
               "own resolution.")


def work_for(image_id: int, kind: str, head: studies.VersionInfo | None) -> Work:
    store = st.session_state.setdefault(WORK, {})
    key = f"{image_id}:{kind}"
    if key not in store:
        store[key] = Work.on(head)
    return store[key]


def show_flash(work: Work, head: studies.VersionInfo | None, drawing: bool) -> None:
    """The last outcome (``services.correction.Note``), until it is outdated."""
    note: Note | None = common.kept(FLASH).get("note")
    if not note:
        return
    if note.outdated(work, drawing):
        common.kept(FLASH).pop("note", None)
        return
    if note.kind == "success":
        st.success(note.text, icon=":material/check_circle:")  # our own words
    elif note.kind == "info":
        st.info(note.text, icon=":material/info:")
    else:
        st.error(md_escape(note.text), icon=":material/block:")  # may name another author
    conflict = note.conflict
    if conflict is not None:
        st.info(
            f"Nothing is lost: your refused mask is saved as your draft version {conflict} "
            "(conflict draft, in the history below). Continue from it on top of the latest "
            "version to merge, or start again from the latest version.",
            icon=":material/save:",
        )
        c1, c2, _ = st.columns([2, 2, 3])
        if c1.button("Continue from my draft", key="correction.merge_draft", type="primary"):
            work.restart(head.id if head else None, conflict)
            common.kept(FLASH).pop("note", None)
            st.rerun()
        if c2.button("Start from the latest version", key="correction.take_latest"):
            work.restart(head.id if head else None, head.id if head else MODEL)
            common.kept(FLASH).pop("note", None)
            st.rerun()


def history(
    info: studies.StudyInfo,
    kind: str,
    work: Work,
    head: studies.VersionInfo | None,
    model_mask: np.ndarray,
    color: tuple[int, int, int],
    pixels: np.ndarray,
    can_edit: bool,
) -> None:
    st.subheader("Version history")
    versions = studies.list_versions(common.db, info.image_id, kind)
    if not versions:
        st.caption("No saved versions yet: the model's mask is the starting point.")
        return
    saved = {v.id: common.version_mask(v.id) for v in versions}
    st.dataframe(
        studies.version_table(versions, saved, model_mask),
        hide_index=True,
        placeholder=display.MISSING,
        key=f"correction.history.{kind}",
    )
    options = [MODEL] + [v.id for v in reversed(versions)]
    by_id = {v.id: v for v in versions}
    col_pick, col_view = st.columns([2, 3])
    with col_pick:
        chosen = st.selectbox(
            "View a version", options, format_func=lambda o: version_label(o, by_id),
            key=f"correction.view.{kind}",
        )
        mask = model_mask if chosen == MODEL else saved[int(chosen)]
        st.metric("Dice vs model", f"{masks.dice(mask, model_mask):.3f}")
        if chosen != MODEL and by_id[int(chosen)].comment:
            st.markdown(f"Comment: _{md_escape(by_id[int(chosen)].comment)}_")
        if can_edit and st.button(
            "Continue editing from this version", key=f"correction.load.{kind}"
        ):
            work.restart(head.id if head else None, chosen)
            st.rerun()
    with col_view:
        h, w = masks.canvas_size(*mask.shape, max_side=384)
        st.image(
            display.mask_on_xray(pixels, mask, color, 0.45, size=(h, w)),
            caption=md_escape(version_label(chosen, by_id)),
        )


def main() -> None:
    st.title("Correction")
    info = common.study_picker(common.selected_study_id(), key="correction.study",
                               steps=SHORTCUTS)
    if info is None:
        return
    common.audit_view(info.image_id, "correction")
    # Every message that comes and goes is written into this one container, so the widgets
    # below keep their place in the page: a canvas that moves is remounted, which would drop
    # its strokes and swallow a click on a save button made at the same moment.
    notices = st.container()
    user = common.user()
    can_edit = identity.can_edit(user)
    if not can_edit:
        notices.warning(
            "Sign in first (sidebar: your name and password): edits and saves carry your name.",
            icon=":material/lock:",
        )
    model, _loaded, message = common.active_model()
    with notices:
        common.model_notice(message)
    pred = (
        common.prediction_for(info.sha256, model.version, info.image_id, model)
        if model is not None
        else None
    )
    if pred is None:
        notices.warning(
            "There is no model mask for this study yet, so there is nothing to correct."
        )
        return
    xray = common.xray_for(info.sha256, info.image_id)

    if "correction.kind" not in st.session_state and KEPT_KIND in st.session_state:
        st.session_state["correction.kind"] = st.session_state[KEPT_KIND]
    kind = st.radio(
        "Mask", studies.MASK_KINDS, format_func=studies.KIND_LABELS.get, horizontal=True,
        key="correction.kind",
    )  # fmt: skip
    st.session_state[KEPT_KIND] = kind
    color = LUNG_COLOR if kind == "lung" else INFECTION_COLOR
    model_mask = pred.lung_mask if kind == "lung" else pred.infection_mask
    head = studies.head_version(common.db, info.image_id, kind)
    work = work_for(info.image_id, kind, head)
    with notices:
        if head is not None and head.id != work.parent:
            st.warning(
                f"{md_escape(head.author)} saved version {head.id} "
                f"({studies.STATUS_LABELS.get(head.status, head.status)}) at "
                f"{fmt_time(head.created)}, after the version you are editing on. "
                "Saving now will be refused; your edit would be kept as a conflict draft.",
                icon=":material/sync_problem:",
            )
    revising = f"correction.revise.{info.image_id}.{kind}"
    locked = approved_lock(can_edit, head, st.session_state.get(revising))
    if locked:
        assert head is not None
        with notices:
            st.info(
                f"Approved by {md_escape(head.author)} at {fmt_time(head.created)} "
                f"(version {head.id}): readers see this mask. A change is a revision that "
                "goes through review again.",
                icon=":material/verified:",
            )
            if st.button("Revise this approved mask", key="correction.revise"):
                st.session_state[revising] = head.id
                st.rerun()
    can_edit = can_edit and not locked

    tool = tool_buttons()
    edits = work.edits_for(model_mask, common.version_mask)
    view_controls(work, edits.shape)
    t2, t3 = st.columns(2)
    with t2:
        brush = st.slider("Brush size", 2, 80, 24, key="correction.brush")
    with t3:
        opacity = st.slider("Mask opacity", 0.0, 1.0, 0.4, 0.05, key="correction.opacity")
    mode, stroke = TOOLS[tool]
    b_undo, b_redo, b_clear, b_reset, _ = st.columns([2, 3, 1.2, 3, 0.8])  # room for the keys

    network = common.click_network()
    current = edits.current()
    ys, xs = work.view.window(current.shape)  # the canvas shows this window of the image
    ch, cw = masks.canvas_size(ys.stop - ys.start, xs.stop - xs.start)
    background = Image.fromarray(
        display.mask_on_xray(xray.pixels[ys, xs], current[ys, xs], color, opacity, (ch, cw))
    )
    left, right = st.columns([3, 2])
    with left:
        st.caption(
            f"Editing the {studies.KIND_LABELS[kind].lower()} starting from {work.base_label()}. "
            "Green strokes add, magenta strokes erase; a polygon closes when you click its "
            "first point; Click: add / remove marks a pixel the mask gets wrong and "
            + ("the click-refinement network redraws the mask around all your clicks. "
               if network is not None else
               "the fix spreads as far as the model's probability map says (at least a "
               "brush spot). ")
            + "Each finished shape becomes part of the mask at once: use Undo, "
            "Redo and Clear above the canvas. " + KEYS_HELP
        )
        result = st_canvas(
            fill_color=masks.canvas_color(stroke),
            stroke_width=brush if mode == "freedraw" else 2,
            stroke_color=masks.canvas_color(stroke),
            background_image=background,
            height=ch,
            width=cw,
            drawing_mode=mode,
            point_display_radius=4,
            return_image_data=True,
            disabled=not can_edit,
            # Keyed by tool too: a tool change mounts a canvas already in that mode, so no
            # click lands in the old mode while the new settings are on their way.
            key=(f"correction.canvas.{info.image_id}.{kind}.{work.canvas}.{view_slug(work.view)}"
                 f".tool-{tool_slug(tool)}"),
        )
    # The shape just drawn joins the history before any button of this run acts on it.
    strokes = result.image_data if can_edit else None
    if mode == "point" and masks.has_strokes(strokes):
        assert strokes is not None
        other = current_mask(common.db, info.image_id, "infection" if kind == "lung" else "lung",
                             pred, common.version_mask)
        acted = apply_click(
            edits, strokes, kind, other, None if kind == "lung" else other, xray.pixels,
            network, lambda: common.probability_maps(info.sha256, info.image_id, model)[kind],
            work.view)
    else:
        acted = masks.has_strokes(strokes) and edits.apply(
            masks.composite_in_view(current, strokes, work.view))
    if b_undo.button("Undo", disabled=not (can_edit and edits.can_undo()),
                     key="correction.undo", icon=":material/undo:",
                     shortcut=SHORTCUTS["undo"]):  # fmt: skip
        acted = edits.undo() or acted
    if b_redo.button("Redo", disabled=not (can_edit and edits.can_redo()),
                     key="correction.redo", icon=":material/redo:",
                     shortcut=SHORTCUTS["redo"]):  # fmt: skip
        acted = edits.redo() or acted
    if b_clear.button("Clear", disabled=not can_edit, key="correction.clear",
                      help=f"Back to {work.base_label()} (undoable)"):  # fmt: skip
        acted = edits.clear() or acted
    if b_reset.button("Reset to the model's mask", disabled=not can_edit,
                      key="correction.reset", help="Undoable"):  # fmt: skip
        acted = edits.apply(model_mask) or acted
    if acted or masks.has_strokes(strokes):
        work.canvas += 1  # a fresh, empty drawing layer over the new mask
        work.nonce += 1
        st.rerun()

    edited = current
    saved_mask = common.version_mask(head.id) if head is not None else model_mask
    changed = not np.array_equal(edited, saved_mask)
    if changed and edits.steps:
        notices.info(
            "Unsaved changes: they stay with this study while you work elsewhere in the app "
            "(this browser session) until you save them.",
            icon=":material/edit_note:",
        )

    def shown(other: str) -> np.ndarray:
        return edited if kind == other else current_mask(
            common.db, info.image_id, other, pred, common.version_mask
        )

    lung, infection = shown("lung"), shown("infection")
    summary = studies.infection_summary(lung, infection)
    with right:
        st.image(
            display.mask_on_xray(xray.pixels, edited, color, 0.45, size=(ch * 3 // 5, cw * 3 // 5)),
            caption="Result: the mask that will be saved",
        )
        m1, m2 = st.columns(2)
        m1.metric("Dice vs model", f"{masks.dice(edited, model_mask):.3f}")
        m2.metric("Changed pixels", f"{masks.changed_pixels(edited, edits.start()):,}")
        m3, m4, m5 = st.columns(3)
        m3.metric("Infection", f"{summary.percent:.1f} %")
        m4.metric("Right lung", f"{summary.percent_right:.1f} %")
        m5.metric("Left lung", f"{summary.percent_left:.1f} %")
        st.caption(
            f"Severity {summary.severity} ({summary.severity_score}/8), {summary.scale}. "
            "Patient's left/right."
        )

    st.subheader("Save")
    comment = st.text_input(
        "Comment (required to send back)", key=f"correction.comment.{kind}", disabled=not can_edit
    )
    buttons = st.columns(4)
    actions = [("Save draft", "draft"), ("Submit for review", "submitted")]
    if identity.can_review(user):
        actions += [("Approve", "approved"), ("Send back", "returned")]
    for col, (label, status) in zip(buttons, actions, strict=False):
        if col.button(
            label,
            key=f"correction.save.{status}",
            disabled=not can_edit,
            type="primary" if status in ("submitted", "approved") else "secondary",
            shortcut=SHORTCUTS.get(status),
        ):
            assert user is not None  # can_edit
            outcome = common.kept(FLASH)  # taken before the save (see common.kept)
            outcome["note"] = save_edit(
                common.db, info.image_id, kind, work, edited, changed, head, user.user_id,
                status, comment, pred.prediction_id,
            )  # fmt: skip
            st.rerun()
    if not identity.can_review(user):
        st.caption("Approve and Send back are for radiologists.")
    with st.container():  # always present: the layout above it never shifts
        show_flash(work, head, False)

    st.divider()
    history(info, kind, work, head, model_mask, color, xray.pixels, can_edit)


main()
