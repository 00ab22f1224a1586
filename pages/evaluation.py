"""Evaluation (researchers): the active model on a labelled folder or on the approved studies,
with what ``training.evaluate`` computes (services.evaluation, services.eval_figures)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages import common
from services import display, eval_figures, evaluation, ingest
from services.text import md_escape

RESULT = "evaluation.result"
PNGS = "evaluation.pngs"  # (report, PNG of each figure): drawn once per evaluation
FOLDER, DATABASE = "A labelled folder", "Studies with approved readings in the database"
LAYOUT_HELP = (
    "Three layouts: COVID-QU-Ex as downloaded (one split is evaluated); a folder with "
    "labels.csv (file,label), images/ and optional lung_masks/ and infection_masks/, as "
    "external-dev; or one folder per class (COVID-19, Non-COVID, Normal) with optional "
    "<name>_lung.png / <name>_infection.png beside each image, as the bundled samples/. "
    "Relative paths start at the InfMap folder."
)


def run_form(loaded: object) -> None:
    source = st.radio("Evaluate on", [FOLDER, DATABASE], key="evaluation.source",
                      horizontal=True)
    folder, split = "", "Test"
    if source == FOLDER:
        c1, c2 = st.columns([4, 1])
        folder = c1.text_input("Labelled folder", value="samples", key="evaluation.folder",
                               help=LAYOUT_HELP)
        split = c2.selectbox("COVID-QU-Ex split", evaluation.SPLIT_NAMES,
                             index=evaluation.SPLIT_NAMES.index("Test"),
                             key="evaluation.split", help="Used for the COVID-QU-Ex layout only.")
    limit = st.number_input(
        "At most this many images (evenly spaced over the set)", min_value=1,
        max_value=evaluation.MAX_IMAGES, value=evaluation.DEFAULT_LIMIT, step=50,
        key="evaluation.limit",
    )
    if not st.button("Run evaluation", type="primary", icon=":material/play_arrow:",
                     key="evaluation.run"):
        return
    bar = st.progress(0.0, text="Starting")

    def progress(fraction: float, text: str) -> None:
        bar.progress(min(max(fraction, 0.0), 1.0), text=text)

    try:
        if source == FOLDER:
            path = evaluation.resolve_folder(folder)
            report = evaluation.evaluate_folder(path, loaded, split, int(limit), progress)
        else:
            report = evaluation.evaluate_database(common.db, loaded, int(limit), progress)
    except evaluation.EvaluationInputError as exc:
        st.session_state.pop(RESULT, None)
        st.error(md_escape(str(exc)), icon=":material/error:")
    else:
        st.session_state[RESULT] = report
    finally:
        bar.empty()


def figure_pngs(report: evaluation.EvaluationReport, figures: dict) -> dict[str, bytes | None]:
    """Each figure as PNG (None where the export failed), drawn once per evaluation: every draw
    starts kaleido's Chromium, and every click on this page reruns it."""
    cached = st.session_state.get(PNGS)
    if cached is None or cached[0] is not report:
        cached = (report, {name: eval_figures.figure_png(fig) for name, fig in figures.items()})
        st.session_state[PNGS] = cached
    return cached[1]


def downloads(report: evaluation.EvaluationReport, figures: dict) -> None:
    st.subheader("Downloads")
    files = evaluation.downloads(report)
    cols = st.columns(len(files))
    for col, (name, (data, mime)) in zip(cols, files.items(), strict=True):
        col.download_button(name, data, file_name=name, mime=mime, key=f"evaluation.dl.{name}")
    png = eval_figures.png_export_available()
    if not png:
        st.caption("PNG export needs the kaleido package, which is not installed: each figure "
                   "is offered as plotly JSON (open it with plotly.io.read_json), and its "
                   "numbers are in metrics.json and curves.json.")
    pngs = figure_pngs(report, figures) if png else {}
    failed = [name for name, data in pngs.items() if data is None]
    if failed:
        st.caption(f"PNG export failed for {', '.join(failed)} (the server log has why): "
                   "their plotly JSON is offered, and the numbers are in metrics.json and "
                   "curves.json.")
    cols = st.columns(len(figures))
    for col, (name, fig) in zip(cols, figures.items(), strict=True):
        if pngs.get(name):
            col.download_button(f"{name}.png", pngs[name], file_name=f"{name}.png",
                                mime="image/png", key=f"evaluation.png.{name}")
        col.download_button(f"{name}.json", fig.to_json(), file_name=f"{name}.json",
                            mime="application/json", key=f"evaluation.json.{name}")


def worst_cases(report: evaluation.EvaluationReport, model: object, loaded: object) -> None:
    st.subheader("Worst cases")
    st.caption("Lowest probability given to the true class first (then lowest lung Dice). "
               "Open one in Review; a file from a folder is stored as an imported study first.")
    cols = st.columns(4)
    for n, case in enumerate(report.worst):
        with cols[n % 4]:
            st.image(case.thumbnail, caption=case.name)
            dice = "" if case.lung_dice is None else f", lung Dice {case.lung_dice:.3f}"
            st.caption(f"true {case.true}, called {case.predicted}, "
                       f"p(true) {case.p_true:.2f}{dice}")
            if st.button("Open in Review", key=f"evaluation.open.{n}",
                         icon=":material/visibility:"):
                handles = [ingest.ModelHandle(model.id, model.version, loaded)]
                try:
                    image_id = evaluation.open_case(common.db, case, handles)
                except evaluation.EvaluationInputError as exc:
                    st.error(md_escape(str(exc)))
                else:
                    common.select_study(image_id)
                    st.switch_page("pages/review.py")


def show(report: evaluation.EvaluationReport, model: object, loaded: object) -> None:
    st.subheader(f"{md_escape(report.title)}: {report.n_images} images, model "
                 f"{md_escape(report.model_version)}")
    for note in report.notes:
        st.caption(md_escape(note))
    left, right = st.columns([2, 3])
    left.dataframe(pd.DataFrame(eval_figures.summary_rows(report.metrics)), hide_index=True,
                   placeholder=display.MISSING, key="evaluation.summary")
    right.dataframe(pd.DataFrame(eval_figures.per_class_rows(report.metrics)), hide_index=True,
                    placeholder=display.MISSING, key="evaluation.per_class")
    figures = eval_figures.all_figures(report.metrics)
    cols = st.columns(2)
    for n, (name, fig) in enumerate(figures.items()):
        with cols[n % 2]:
            st.plotly_chart(fig, key=f"evaluation.figure.{name}")
    downloads(report, figures)
    worst_cases(report, model, loaded)


def main() -> None:
    st.title("Evaluation")
    st.caption("For researchers: how the active model does on a labelled set, computed as "
               "`python -m training.evaluate` does it (same code).")
    model, loaded, message = common.active_model()
    common.model_notice(message)
    if model is None or loaded is None:
        st.warning("No usable model: nothing to evaluate.")
        return
    run_form(loaded)
    report = st.session_state.get(RESULT)
    if report is not None:
        show(report, model, loaded)


main()
