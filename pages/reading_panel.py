"""The reading of a study on the Review page: label + finding, saved as versions like masks.

Not a page itself. An annotator saves a draft or submits for review; a radiologist may also
approve (their own reading, or the submitted one as it is) or send it back. What the form is
made on (``base``: the head when the form was first shown, or after the user's last save) is
kept per study in the session, so a reading someone else saved meanwhile makes the save refused
and kept as the user's conflict draft (``services.reading_labels.save_reading``).
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from pages import common
from services import identity, reading_labels, studies
from services.text import fmt_time, md_escape
from settings import READING_LABELS

BASES = "reading.base"  # image id -> the head version id the form was made on (None: none)
FLASH = "reading.flash"
FORM_KEYS = ("reading.label", "reading.finding", "reading.comment")


def _reset_form(image_id: int, head: reading_labels.ReadingInfo | None) -> None:
    """Start the form again from ``head`` (the widgets take its values on the next run)."""
    st.session_state.setdefault(BASES, {})[image_id] = head.id if head else None
    for key in FORM_KEYS:
        st.session_state.pop(f"{key}.{image_id}", None)


def _flash(
    box: dict[str, Any], image_id: int, ok: bool, text: str, conflict: int | None = None
) -> None:
    """Record a save's outcome in ``box``, ``common.kept(FLASH)`` taken before the save."""
    box["note"] = {"image_id": image_id, "ok": ok, "text": text, "conflict": conflict}


def _show_flash(image_id: int, head: reading_labels.ReadingInfo | None) -> None:
    note = common.kept(FLASH).get("note")
    if not note or note["image_id"] != image_id:
        return
    if note["ok"]:
        st.success(note["text"], icon=":material/check_circle:")
        return
    st.error(md_escape(note["text"]), icon=":material/block:")  # may name another author
    if note["conflict"] is not None:
        st.info(
            f"Nothing is lost: your reading is kept as your draft version {note['conflict']} "
            "(conflict draft, in the reading history). Start from the latest reading and save "
            "again if you still disagree with it.",
            icon=":material/save:",
        )
        if st.button("Start from the latest reading", key="reading.take_latest"):
            _reset_form(image_id, head)
            common.kept(FLASH).pop("note", None)
            st.rerun()


def _save(
    info: studies.StudyInfo,
    user: identity.Identity,
    status: str,
    label: str,
    finding: str,
    comment: str,
    head: reading_labels.ReadingInfo | None,
    base: int | None,
    prediction_id: int | None,
) -> None:
    bases, box = st.session_state.setdefault(BASES, {}), common.kept(FLASH)  # before the save
    unchanged = head is not None and head.id == base and (head.label, head.finding or "") == (
        label, finding.strip()
    )
    if unchanged and status == "draft":
        outcome = studies.SaveOutcome(False, None, f"Nothing to save: the reading is version "
                                                   f"{base} as it is.")
    elif unchanged and base is not None:
        outcome = reading_labels.change_reading_status(
            common.db, info.image_id, user.user_id, status, base, comment
        )
    else:
        outcome = reading_labels.save_reading(
            common.db, info.image_id, label, finding, user.user_id, status, base, comment,
            prediction_id,
        )
    if outcome.ok:
        bases[info.image_id] = outcome.version_id
    _flash(box, info.image_id, outcome.ok, outcome.message,
           None if outcome.ok else outcome.version_id)


def reading_section(info: studies.StudyInfo, pred: studies.PredictionView | None) -> None:
    st.subheader("Reading")
    user = common.user()
    can_edit = identity.can_edit(user)
    head = reading_labels.head_reading(common.db, info.image_id)
    bases = st.session_state.setdefault(BASES, {})
    if info.image_id not in bases:
        bases[info.image_id] = head.id if head else None
    base = bases[info.image_id]
    if head is None:
        st.caption("No reading recorded for this study yet.")
    else:
        st.markdown(f"Latest: **{md_escape(head.describe())}**")
        if head.finding:
            st.markdown(f"Finding: _{md_escape(head.finding)}_")
        if pred is not None:
            mark = reading_labels.agreement(head, pred.predicted_class)
            if mark == "disagrees":
                st.warning(f"The reading differs from the model's class "
                           f"({pred.predicted_class}).", icon=":material/compare_arrows:")
    if head is not None and head.id != base:
        st.warning(
            f"{md_escape(head.author)} saved reading version {head.id} "
            f"({studies.STATUS_LABELS.get(head.status, head.status)}) at "
            f"{fmt_time(head.created)}, after the version your form started from. "
            "Saving now will be refused; your reading would be kept as a conflict draft.",
            icon=":material/sync_problem:",
        )
    if not can_edit:
        st.caption("Sign in (sidebar) to record a reading: it carries your name.")

    # The form starts from the reading it is made on (the head when first shown).
    start = head if head is not None and head.id == base else None
    label_key = f"reading.label.{info.image_id}"
    finding_key = f"reading.finding.{info.image_id}"
    if label_key not in st.session_state:
        st.session_state[label_key] = start.label if start else None
        st.session_state[finding_key] = (start.finding or "") if start else ""
    label = st.radio(
        "Reading", READING_LABELS, format_func=reading_labels.LABEL_TEXT.get, horizontal=True,
        key=label_key, disabled=not can_edit,
        help="COVID-19, Non-COVID pneumonia and Normal teach the class head when fine-tuning; "
        "other finding and not assessable are recorded but are not class targets.",
    )
    finding = st.text_area("Finding (free text)", key=finding_key, disabled=not can_edit,
                           height=80)
    comment = st.text_input("Comment (required to send back)",
                            key=f"reading.comment.{info.image_id}", disabled=not can_edit)
    actions = [("Save reading as draft", "draft"), ("Submit reading", "submitted")]
    if identity.can_review(user):
        actions += [("Approve reading", "approved"), ("Send reading back", "returned")]
    cols = st.columns(4)
    for col, (text, status) in zip(cols, actions, strict=False):
        if col.button(text, key=f"reading.save.{status}", disabled=not can_edit or label is None,
                      type="primary" if status in ("submitted", "approved") else "secondary"):
            assert user is not None and label is not None
            _save(info, user, status, label, finding, comment, head, base,
                  pred.prediction_id if pred is not None else None)
            st.rerun()
    if can_edit and not identity.can_review(user):
        st.caption("Approve and Send back are for radiologists.")
    _show_flash(info.image_id, head)

    versions = reading_labels.list_readings(common.db, info.image_id)
    if versions:
        with st.expander(f"Reading history ({len(versions)})", expanded=False):
            st.dataframe(reading_labels.history_table(versions), hide_index=True,
                         key="reading.history")
