"""The PACS on the Worklist (find and import studies) and on Review (send the SEG back), shown
only when ``INFMAP_DICOMWEB_URL`` is set. Not a page itself; the work is ``services.dicomweb``."""

from __future__ import annotations

from datetime import date
from typing import Any

import streamlit as st

import settings
from pages import common
from services import datastore, dicomweb, ingest, readings, studies
from services.dicom_seg import SegError
from services.text import md_escape

HITS = "pacs.hits"


def import_section(
    model: studies.ModelInfo | None, loaded: object | None, uploads: dict[str, Any]
) -> None:
    """Search (date range, modality, patient hash) and import the chosen studies; the outcomes
    go to ``uploads["results"]`` (``common.kept``), shown with the uploads'."""
    st.caption(f"DICOMweb server: {md_escape(settings.dicomweb_url() or '')}")
    c1, c2, c3, c4 = st.columns([2, 2, 2, 3], vertical_alignment="bottom")
    start = c1.date_input("From", value=None, key="pacs.from", min_value=date(1980, 1, 1))
    end = c2.date_input("To", value=None, key="pacs.to", min_value=date(1980, 1, 1))
    modalities = c3.multiselect("Modality", list(dicomweb.RADIOGRAPHY),
                                default=list(dicomweb.RADIOGRAPHY), key="pacs.modality")
    patient = c4.text_input("Patient hash (start)", key="pacs.patient",
                            help="The hashed patient ID InfMap shows; at least 8 characters.")
    if st.button("Search the PACS", icon=":material/search:", key="pacs.search"):
        try:
            pacs = dicomweb.connect()
            st.session_state[HITS] = dicomweb.search_studies(
                pacs, start, end, modalities, patient or None
            )
        except dicomweb.DicomWebError as exc:
            st.error(str(exc), icon=":material/error:")
            st.session_state[HITS] = []
    hits: list[dicomweb.StudyHit] = st.session_state.get(HITS, [])
    if not hits:
        if HITS in st.session_state:
            st.info("No CR/DX studies match.")
        return
    table = [
        {"date": h.study_date, "modalities": ", ".join(h.modalities), "instances": h.instances,
         "patient hash": (h.patient_hash or "")[:12], "description": h.description}
        for h in hits
    ]
    st.dataframe(table, hide_index=True, key="pacs.table")
    rows = st.multiselect(
        "Studies to import", list(range(len(hits))), key="pacs.chosen",
        format_func=lambda i: f"{i + 1}: {hits[i].study_date or 'undated'} · "
        f"{', '.join(hits[i].modalities)} · patient {(hits[i].patient_hash or '?')[:12]}",
    )
    if st.button(f"Import {len(rows)} studies", disabled=not rows, key="pacs.import",
                 icon=":material/download:"):
        who = common.user()
        handles = (
            [ingest.ModelHandle(model.id, model.version, loaded)]
            if model is not None and loaded is not None
            else []
        )
        progress = st.progress(0.0, text="Retrieving from the PACS...")

        def show_progress(i: int, item: datastore.SourceItem) -> None:
            progress.progress(min(i / max(len(rows), 1), 1.0),
                              text=f"Analysing {md_escape(item.name)}")

        try:
            report = dicomweb.import_studies(
                common.db, dicomweb.connect(), [hits[i] for i in rows], handles, show_progress
            )
        except dicomweb.DicomWebError as exc:
            progress.empty()
            st.error(f"Nothing was imported: {exc}", icon=":material/error:")
            return
        uploads["results"] = report.outcomes
        added = sum(o.ok and o.created for o in report.outcomes)
        common.audit_as(who, "import", None, f"PACS: {added} added of {len(report.outcomes)}")
        progress.empty()
        if report.skipped:
            st.toast(f"{report.skipped} objects that are not CR/DX radiographs were left out.")
        st.rerun()


def push_button(image_id: int, shown: readings.Reading, model_version: str) -> None:
    """Send the masks shown to the PACS as DICOM SEG (Review page)."""
    versions = {kind: v.id for kind, v in shown.items()}
    if st.button("Send DICOM SEG to the PACS", icon=":material/cloud_upload:", key="pacs.push"):
        try:
            st.success(dicomweb.push_seg(common.db, dicomweb.connect(), image_id, versions,
                                         model_version))
            common.audit("export", image_id, "DICOM SEG sent to the PACS")
        except (dicomweb.DicomWebError, SegError, LookupError) as exc:
            st.error(str(exc), icon=":material/error:")
