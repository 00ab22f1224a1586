"""Review: the X-ray, the lung and infection masks and Grad-CAM side by side.

The masks and figures shown are what readers should see: the current human version of each
mask (approved, else submitted; services.readings) with its author, else the model's; the
model's own output is one click away ("Masks shown"). Below them the reader records the
study's reading (label + finding, versioned like masks: pages.reading_panel).
"""

from __future__ import annotations

import html

import numpy as np
import streamlit as st

import settings
from inference.windowing import apply_window
from pages import common, pacs_panel, panel_chart, reading_panel
from services import display, readings, seg_export, studies, study_report
from services.dicom_seg import SegError

PLOTLY_CONFIG = {
    "scrollZoom": True,
    "displaylogo": False,
    "modeBarButtonsToRemove": ["select2d", "lasso2d", "toImage"],
}
MANUAL = "Manual"
# The de-identified UID stand-ins are for DICOM SEG references, not for reading.
HIDDEN_FIELDS = {"study_uid", "series_uid", "sop_instance_uid", "sop_class_uid"}


@st.cache_data(show_spinner=False, max_entries=16)
def display_base(sha256: str, image_id: int) -> dict[str, np.ndarray | None]:
    """The X-ray reduced to the display grid once: raw (for window/level) and default pixels."""
    xray = common.xray_for(sha256, image_id)
    grid = display.DisplayGrid.for_shape(*xray.pixels.shape)
    return {
        "pixels": grid.image(xray.pixels),
        "raw": None if xray.raw is None else grid.image(xray.raw.astype(np.float32)),
    }


def window_controls(xray: object, sha256: str) -> tuple[float, float] | None:
    """Window/level widgets for DICOM; returns (centre, width) in raw units or None."""
    if xray.raw is None:
        st.caption("Window/level: DICOM studies only (this one is an 8-bit image).")
        return None
    presets = display.window_presets(xray.raw, xray.window, xray.invert)
    choice = st.selectbox(
        "Window preset",
        [*presets, MANUAL],
        key=f"review.preset.{sha256}",
        help="Header: the file's own window. Lung / Mediastinum / Bone / Full range are set "
        "relative to this image's raw value range (X-rays have no Hounsfield units).",
    )
    centre, width = presets.get(choice, next(iter(presets.values())))
    if choice == MANUAL:
        lo, hi = display.raw_range(xray.raw)
        span = max(hi - lo, 1.0)
        c1, c2 = st.columns(2)
        centre = c1.number_input(
            "Centre",
            value=float(round((lo + hi) / 2, 1)),
            step=span / 50,
            key=f"review.centre.{sha256}",
        )
        width = c2.number_input(
            "Width",
            min_value=1.0,
            value=float(round(span, 1)),
            step=span / 50,
            key=f"review.width.{sha256}",
        )
    st.caption(f"Centre {centre:.0f}, width {width:.0f} (raw units)")
    return float(centre), float(width)


CURRENT, MODEL_OUTPUT = "Current reading", "Model output"


def reading_notes(reading: readings.Reading, showing_model: bool) -> None:
    if not reading:
        st.caption("No approved or submitted human masks yet: the masks are the model's.")
        return
    if showing_model:
        st.caption("Showing the model's output. The current reading has human masks.")
        return
    for kind in studies.MASK_KINDS:
        label = studies.KIND_LABELS[kind]
        if kind in reading:
            approved = reading[kind].status == "approved"
            icon = ":material/verified:" if approved else ":material/pending:"
            st.markdown(f"{icon} **{label}**: {reading[kind].describe()}")
        else:
            st.markdown(f":material/smart_toy: **{label}**: the model's")


def domain_warning(verdict: studies.DomainVerdict) -> None:
    """Above the panels: out of domain is the first thing a reader sees."""
    if verdict.state == "out":
        st.error(f"**{verdict.headline}.** {verdict.detail}", icon=":material/report:")


def domain_facts(verdict: studies.DomainVerdict) -> None:
    icon = {"in": ":material/check_circle:", "out": ":material/report:"}.get(
        verdict.state, ":material/help:"
    )
    st.markdown(f"{icon} **Domain**: {verdict.headline}")
    st.caption(verdict.detail if verdict.state != "out" else "See the warning above.")


def facts(
    info: studies.StudyInfo,
    pred: studies.PredictionView,
    model_version: str,
    summary: studies.InfectionSummary,
    source: str,
    verdict: studies.DomainVerdict,
    calibration_note: str,
) -> None:
    out_of_domain = verdict.state == "out"
    left, mid, right = st.columns([4, 4, 3])
    with left:
        st.subheader("Class probabilities")
        if out_of_domain:
            st.caption("Out of domain: these probabilities have no known accuracy here.")
        st.plotly_chart(
            display.probabilities_figure(pred.probabilities),
            key="review.probabilities",
            config={"displayModeBar": False},
        )
        call = (
            "Class: **not called** (out of domain)"
            if out_of_domain
            else f"Predicted: **{pred.predicted_class}** ({pred.confidence:.1%})"
        )
        st.markdown(
            f"{call}  \n"
            f"Uncertainty: {pred.uncertainty:.3f} bits (mean entropy inside the lungs)"
        )
        st.caption(calibration_note)
        domain_facts(verdict)
    with mid:
        st.subheader("Infection")
        st.caption(f"From {source}.")
        m1, m2, m3 = st.columns(3)
        m1.metric("Both lungs", f"{summary.percent:.1f} %")
        m2.metric("Patient's right", f"{summary.percent_right:.1f} %")
        m3.metric("Patient's left", f"{summary.percent_left:.1f} %")
        if out_of_domain:  # no grade in large type on an image unlike the training data
            st.markdown(
                f"Severity: {summary.severity} · {summary.severity_score}/8 "
                "(**not to be trusted**: out of domain)"
            )
        else:
            st.metric("Severity", f"{summary.severity} · {summary.severity_score}/8")
        st.caption(
            f"Scale: {studies.SCALE_NAME}. Per lung 0-4 by infected share (<1 % noise floor, "
            "<25, 25-50, 50-75, >75 %), summed 0-8; bands: none 0, mild 1-2, moderate 3-5, "
            "severe 6-8. Patient's left is the image's right on a frontal view."
        )
    with right:
        st.subheader("Study")
        st.markdown(f"Model version: **{model_version}**  \nStudy: #{info.image_id}")
        summary = {k: v for k, v in info.metadata.items()
                   if v not in (None, "", []) and k not in HIDDEN_FIELDS}
        summary.setdefault("rows", info.height)
        summary.setdefault("columns", info.width)
        st.dataframe(
            [
                {"Field": k.replace("_", " ").capitalize(), "Value": str(v)}
                for k, v in summary.items()
            ],
            hide_index=True,
            key="review.header",
        )
        st.caption("De-identified summary: no names, dates of birth or IDs are kept.")


def report_download(
    image_id: int, pred: studies.PredictionView, masks: dict[str, np.ndarray],
    shown: readings.Reading, cam: np.ndarray, cam_class: str | None,
) -> None:
    """The one-page study report of what is shown, with the reading and its signer."""
    with st.expander("Study report (one page: panels, figures, reading, model version)"):
        fmt = st.radio("Format", ["pdf", "png"], horizontal=True, key="review.report_format")
        wanted = (image_id, tuple(sorted((k, v.id) for k, v in shown.items())), cam_class, fmt)
        if st.button("Prepare study report", icon=":material/description:", key="review.report"):
            with st.spinner("Drawing the report..."):
                made = study_report.review_report(
                    common.db, image_id, pred, masks, readings.source_label(shown), cam,
                    cam_class or "(model not loaded)", fmt,
                )
            st.session_state["review.report_file"] = (wanted, made)
        ready = st.session_state.get("review.report_file")
        if ready is not None and ready[0] == wanted:
            name, data, mime = ready[1]
            st.download_button("Download study report", data, file_name=name, mime=mime,
                               icon=":material/download:", key="review.report_download")


def seg_download(image_id: int, shown: readings.Reading, model_version: str) -> None:
    """The masks shown as a DICOM SEG (with its Secondary Capture for a PNG/JPEG study)."""
    versions = {kind: v.id for kind, v in shown.items()}
    wanted = (image_id, tuple(sorted(versions.items())), model_version)
    with st.expander("Export the masks shown as DICOM SEG"):
        st.caption(
            "Two segments (lung, infection) referring to the de-identified image; a PNG/JPEG "
            "study comes with a DICOM Secondary Capture of its image, in one ZIP."
        )
        if st.button("Prepare DICOM SEG", icon=":material/deployed_code:", key="review.seg"):
            try:
                made = seg_export.study_seg(common.db, image_id, versions, model_version)
            except (SegError, LookupError) as exc:
                st.error(str(exc))
            else:
                st.session_state["review.seg_file"] = (wanted, made.download())
        ready = st.session_state.get("review.seg_file")
        if ready is not None and ready[0] == wanted:
            name, data, mime = ready[1]
            st.download_button(
                "Download DICOM SEG", data, file_name=name, mime=mime,
                icon=":material/download:", key="review.seg_download",
                on_click=common.audit, args=("export", image_id, "DICOM SEG"),
            )
        if settings.dicomweb_url() is not None:
            pacs_panel.push_button(image_id, shown, model_version)


def main() -> None:
    st.title("Review")
    info = common.study_picker(common.selected_study_id(), key="review.study")
    if info is None:
        return
    common.audit_view(info.image_id, "review")
    st.info(common.DISCLAIMER, icon=":material/info:")
    model, loaded, message = common.active_model()
    common.model_notice(message)
    try:
        xray = common.xray_for(info.sha256, info.image_id)
    except Exception as exc:  # a missing or corrupt payload: say so, no traceback
        common.log.exception("cannot read study %s", info.image_id)
        st.error(f"The stored image of this study cannot be read ({exc}).")
        return
    pred = (
        common.prediction_for(info.sha256, model.version, info.image_id, model)
        if model is not None
        else None
    )

    reading = readings.reading_for(common.db, info.image_id)
    showing_model = (
        st.segmented_control(
            "Masks shown",
            [CURRENT, MODEL_OUTPUT],
            default=CURRENT,
            key="review.source",
            help="The current reading uses the approved (else submitted) human masks.",
        )  # fmt: skip
        == MODEL_OUTPUT
        if reading and pred is not None
        else False
    )
    shown: readings.Reading = {} if showing_model else reading
    reading_notes(reading, showing_model)
    calibration = loaded.calibration if loaded is not None else None
    verdict = (
        studies.domain_verdict(pred, calibration.ood_threshold if calibration else None)
        if pred is not None
        else None
    )
    if verdict is not None:
        domain_warning(verdict)

    controls = st.columns([3, 3, 3, 2], vertical_alignment="bottom")
    with controls[0]:
        opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05, key="review.opacity")
    with controls[1]:
        window = window_controls(xray, info.sha256)
    with controls[2]:
        class_names = list(pred.probabilities) if pred is not None else []
        cam_class = st.selectbox(
            "Grad-CAM explains",
            class_names,
            index=class_names.index(pred.predicted_class) if pred is not None else None,
            key=f"review.cam_class.{info.sha256}",
            disabled=pred is None or loaded is None,
            help="Which class's evidence the heat map shows (default: the predicted class).",
        )
    with controls[3]:
        if st.button("Correct masks", icon=":material/brush:", type="primary"):
            common.select_study(info.image_id)
            st.switch_page("pages/correction.py")

    base = display_base(info.sha256, info.image_id)
    grid = display.DisplayGrid.for_shape(*xray.pixels.shape)
    pixels = base["pixels"]
    if window is not None and base["raw"] is not None:
        pixels = apply_window(base["raw"], window[0], window[1], xray.invert)

    titles = list(display.PANEL_TITLES)
    if pred is None:
        empty = np.zeros(xray.pixels.shape, bool)
        lung, infection, cam = empty, empty, np.zeros(grid.shape, np.float32)
        titles[1:] = [f"{t} (no prediction)" for t in titles[1:]]
    else:
        masks = readings.masks_read(shown, pred, common.version_mask)
        lung, infection = masks["lung"], masks["infection"]
        for i, kind in ((1, "lung"), (2, "infection")):
            if kind in shown:
                author = html.escape(shown[kind].author)  # Plotly titles take HTML, links too
                titles[i] = f"{titles[i]} ({shown[kind].status}, {author})"
            elif reading and not showing_model:
                titles[i] = f"{titles[i]} (model)"
        if loaded is not None and cam_class:
            cam = common.gradcam_for(
                info.sha256, model.version, cam_class, info.image_id, model.checkpoint_path
            )
            titles[3] = f"Grad-CAM: {cam_class}"
        else:
            cam = np.zeros(grid.shape, np.float32)
            titles[3] = "Grad-CAM (model not loaded)"
    panels = display.panel_images(pixels, lung, infection, cam, opacity, grid)
    fig = display.panels_figure(panels, grid, tuple(titles))
    fig.update_layout(uirevision=f"panels-{info.image_id}")
    # Same study, same uirevision: a new opacity, window or Grad-CAM class keeps the view.
    panel_chart.kept_view_chart(fig, key="review.panels", config=PLOTLY_CONFIG)
    st.caption("Scroll to zoom, drag to pan: all four panels move together. Double-click to reset.")

    if pred is None:
        st.warning("No prediction for this study yet (no usable model).")
    else:
        summary = studies.infection_summary(lung, infection)
        source = (
            "the model's masks"
            if not shown
            else "the human masks read"
            if len(shown) == len(studies.MASK_KINDS)
            else "the human and model masks read"
        )
        assert verdict is not None  # set whenever there is a prediction
        note = studies.calibration_note(
            calibration.temperature if calibration else None,
            calibration.covid_threshold if calibration else None,
        )
        facts(info, pred, model.version, summary, source, verdict, note)
        seg_download(info.image_id, shown, model.version)
        report_download(info.image_id, pred, {"lung": lung, "infection": infection}, shown,
                        cam, cam_class if loaded is not None else None)
    st.divider()
    reading_panel.reading_section(info, pred)


main()
