"""Worklist (default page): every study with its prediction, its reading (marked where it
disagrees with the model's class) and review status; uploads."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import settings
from inference.model import CLASS_NAMES
from pages import common, pacs_panel
from services import datastore, display, ingest, reading_labels, readings, studies
from services.text import md_escape
from services.worklist_table import worklist_records

UPLOADS = "worklist.uploads"  # common.kept: "nonce" (the uploader's) and "results"
LAST_SELECTION = "worklist.last_selection"


def open_study(image_id: int, page: str = "pages/review.py") -> None:
    common.select_study(image_id)
    st.switch_page(page)


def upload_section(model: studies.ModelInfo | None, loaded: object | None) -> None:
    uploads = common.kept(UPLOADS)  # taken before any import (see common.kept)
    nonce = uploads.setdefault("nonce", 0)
    files = st.file_uploader(
        "Upload chest X-rays: DICOM, PNG or JPEG, one or many",
        accept_multiple_files=True,
        key=f"worklist.uploader.{nonce}",
        help="Each file is stored once (by content) and predicted once per model version. "
        "The format is recognised from the content, not the file name. "
        f"At most {settings.upload_limit_mb()} MB per file.",
    )
    if files:
        who = common.user()
        handles = (
            [ingest.ModelHandle(model.id, model.version, loaded)]
            if model is not None and loaded is not None
            else []
        )
        progress = st.progress(0.0)

        def show_progress(i: int, item: datastore.SourceItem) -> None:
            label = f"Analysing {md_escape(item.name)} ({i + 1}/{len(files)})"
            progress.progress(i / len(files), text=label)

        upload = datastore.UploadSource([(f.name, f.getvalue()) for f in files])
        outcomes = datastore.ingest_source(common.db, upload, handles, before_each=show_progress)
        uploads["results"], uploads["nonce"] = outcomes, nonce + 1  # a fresh, empty uploader
        added = sum(o.ok and o.created for o in outcomes)
        present = sum(o.ok and not o.created for o in outcomes)
        common.audit_as(who, "import", None, f"upload: {added} added, {present} already "
                        f"present, {len(outcomes) - added - present} refused")  # no file names
        progress.empty()
        st.rerun()

    outcomes = uploads.get("results", [])
    for n, o in enumerate(outcomes):
        if not o.ok:
            st.error(
                f"**{md_escape(o.name)}** was not added: {md_escape(o.error)}",
                icon=":material/error:",
            )
            continue
        cols = st.columns([6, 1], vertical_alignment="center")
        with cols[0]:
            if o.created:
                ran = f" Predicted by model {', '.join(o.predicted)}." if o.predicted else ""
                st.success(f"**{md_escape(o.name)}** added as study #{o.image_id}.{ran}")
            else:
                st.info(
                    f"**{md_escape(o.name)}** is already study #{o.image_id} (same file content): "
                    "not stored or predicted again."
                )
        with cols[1]:
            if st.button("Review", key=f"worklist.open_upload.{n}", icon=":material/visibility:"):
                open_study(o.image_id)
    if outcomes and st.button("Clear messages", key="worklist.clear_results"):
        uploads["results"] = []
        st.rerun()


def figures_read(rows: list, model: studies.ModelInfo | None) -> dict:
    """Per study with a current human version: the figures from what readers see."""
    current = readings.current_versions(common.db)
    read = {}
    for row in rows:
        reading = current.get(row.image_id)
        if reading:
            summary = common.summary_read(row.sha256, row.image_id, reading, model)
            if summary is not None:
                read[row.image_id] = (summary, readings.source_label(reading))
    return read


def worklist_table(rows: list, model: studies.ModelInfo | None, sort: str) -> int | None:
    """The table, ordered by ``sort`` on the figures shown; returns the study picked by a row
    click (None when nothing new)."""
    records = worklist_records(rows, figures_read(rows, model), sort)
    read = reading_labels.current_readings(common.db)
    by_id = {row.image_id: row for row in rows}  # records may be re-sorted: match by id
    for rec in records:
        row = by_id[rec["id"]]
        rec["thumbnail"] = common.thumbnail(row.sha256, row.image_id)
        rec.update(reading_labels.worklist_columns(row.image_id, row.predicted_class, read))
    frame = pd.DataFrame.from_records(records)
    columns = [
        "thumbnail", "study", "class", "reading", "agreement", "confidence", "infection %",
        "severity", "masks", "status", "last touched by", "last touched (UTC)", "in domain",
        "ood score", "uncertainty",
        "added (UTC)",
    ]  # fmt: skip
    event = st.dataframe(
        frame,
        column_order=columns,
        hide_index=True,
        row_height=64,
        placeholder=display.MISSING,
        on_select="rerun",
        selection_mode="single-row",
        key="worklist.table",
        column_config={
            "thumbnail": st.column_config.ImageColumn("X-ray", width="small"),
            "study": st.column_config.TextColumn("Study", width="large"),
            "class": st.column_config.TextColumn("Predicted class"),
            "reading": st.column_config.TextColumn(
                "Reading", help="The reader's reading: approved, else submitted (Review page)"
            ),
            "agreement": st.column_config.TextColumn(
                "Model vs reading", help="✗ where the reading is a class the model did not call"
            ),
            "confidence": st.column_config.ProgressColumn(
                "Confidence", min_value=0.0, max_value=1.0, format="percent"
            ),
            "infection %": st.column_config.NumberColumn("Infection %", format="%.1f %%"),
            "severity": st.column_config.TextColumn(
                "Severity", help="CXR extent score 0-8 (modified RALE, Wong et al. 2020)"
            ),
            "masks": st.column_config.TextColumn(
                "Masks read",
                help="Whose masks the infection % and severity come from: the current human "
                "version (approved, else submitted) or the model's.",
            ),
            "uncertainty": st.column_config.NumberColumn(
                "Uncertainty", format="%.3f", help="Mean binary entropy (bits) inside the lungs"
            ),
            "in domain": st.column_config.TextColumn(
                "In domain",
                help="Whether the image is like the chest X-rays the model was trained on "
                "(its out-of-domain score within the limit 95% of validation X-rays meet). "
                "Out of domain: do not trust the model's class or severity.",
            ),
            "ood score": st.column_config.NumberColumn(
                "OOD score", format="%.2f", help="Out-of-domain score: higher is further from "
                "the training images"
            ),
            "status": st.column_config.TextColumn("Status"),
            "last touched by": st.column_config.TextColumn("Last touched by"),
            "last touched (UTC)": st.column_config.TextColumn("Last touched (UTC)"),
            "added (UTC)": st.column_config.TextColumn("Added (UTC)"),
        },
    )
    selected = list(event.selection.rows) if event is not None else []
    picked = int(frame.iloc[selected[0]]["id"]) if selected else None
    if picked != st.session_state.get(LAST_SELECTION):
        st.session_state[LAST_SELECTION] = picked
        return picked
    return None


def main() -> None:
    st.title("Worklist")
    model, loaded, message = common.active_model()
    common.model_notice(message)

    with st.expander("Add studies", expanded=True, icon=":material/upload_file:"):
        upload_section(model, loaded)
    if settings.dicomweb_url() is not None:
        with st.expander("Import from the PACS (DICOMweb)", icon=":material/cloud_download:"):
            pacs_panel.import_section(model, loaded, common.kept(UPLOADS))

    f1, f2, f5, f3, f4 = st.columns([3, 3, 2, 2, 2], vertical_alignment="bottom")
    with f1:
        statuses = st.multiselect(
            "Status",
            studies.WORKLIST_STATUSES,
            format_func=lambda s: studies.STATUS_LABELS.get(s, s),
            key="worklist.status",
            placeholder="All",
        )
    with f2:
        classes = st.multiselect(
            "Predicted class", CLASS_NAMES, key="worklist.class", placeholder="All"
        )
    with f5:
        domain_labels = st.multiselect(
            "In domain",
            list(studies.DOMAIN_FILTERS),
            key="worklist.domain",
            placeholder="All",
            help="Out of domain: the image is unlike the model's training X-rays.",
        )
    domains = [studies.DOMAIN_FILTERS[label] for label in domain_labels]
    with f3:
        sort_label = st.selectbox("Sort", list(studies.SORTS), key="worklist.sort")
    with f4:
        user = common.user()
        role = user.role if user is not None else None
        queue = "the review queue" if role == "radiologist" else "new studies"
        if st.button("Next study to review", type="primary", icon=":material/skip_next:",
                     help=f"Signed in as {role or 'nobody'}: {queue} first"):  # fmt: skip
            visited = st.session_state.get(common.VISITED_KEY, [])
            nxt = studies.next_to_review(common.db, exclude=visited, role=role)
            if nxt is None:
                st.toast("Nothing left to review: no new, submitted or sent-back studies.")
            else:
                open_study(nxt)

    sort = studies.SORTS[sort_label]
    rows = studies.worklist(common.db, statuses, classes, sort, domains)
    filtered = bool(statuses or classes or domains)
    total = len(studies.worklist(common.db)) if filtered else len(rows)
    st.caption(f"{len(rows)} of {total} {'study' if total == 1 else 'studies'}")
    if not rows:
        st.info("No studies match these filters." if total else "No studies yet: upload one.")
        return

    picked = worklist_table(rows, model, sort)
    ids = [r.image_id for r in rows]
    names = {r.image_id: r.display_name for r in rows}
    # One chosen study, shown by the picker and opened by the buttons. The picker's key
    # follows its options: filtered to other studies, it is a fresh widget on a valid study,
    # never one that still shows a study the filter removed.
    current = common.selected_study_id()
    chosen = picked if picked is not None else current if current in names else ids[0]
    picker_key = f"worklist.picker.{hash(tuple(ids))}"
    if picked is not None or picker_key not in st.session_state:
        st.session_state[picker_key] = chosen
    c1, c2, c3 = st.columns([4, 1, 1], vertical_alignment="bottom")
    with c1:
        chosen = st.selectbox(
            "Open a study (or click a row)",
            ids,
            format_func=lambda i: f"#{i} · {names[i]}",
            key=picker_key,
        )
    with c2:
        if st.button("Review", icon=":material/visibility:", key="worklist.review"):
            open_study(chosen)
    with c3:
        if st.button("Correct masks", icon=":material/brush:", key="worklist.correct"):
            open_study(chosen, "pages/correction.py")


main()
