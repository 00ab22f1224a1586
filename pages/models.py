"""Models: versions with metrics and lineage, fine-tuning on the corrections, activation.

Thin page: everything that reads or changes versions and runs, re-predicts or starts and stops
processes is ``services.model_admin``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import settings
from pages import common
from services import dataset_export, display, identity
from services import model_admin as admin
from services.text import fmt_time
from training.finetune import FinetuneOptions

SELECTED = "models.version"
SEEN_RUN = "models.seen_run"
CONFIRM = "models.confirm_rejected"  # the version id whose gate rejection awaits confirmation
STOP = "models.confirm_stop"


def can_manage() -> bool:
    u = common.user()
    return admin.can_manage(u.role if u is not None else None)


def user_id() -> int:
    u = common.user()
    return u.user_id if u is not None else -1  # no user: the service refuses


@contextmanager
def refusal_shown() -> Iterator[None]:
    """A service's refusal (wrong role, account gone) as an error on the page."""
    try:
        yield
    except (admin.RoleError, LookupError) as exc:
        st.error(str(exc), icon=":material/block:")


# ----------------------------------------------------------------------------- sections
def versions_section(records: list[dict[str, Any]]) -> None:
    st.subheader("Model versions")
    if not records:
        st.info("No model version is registered yet.")
        return
    table = pd.DataFrame([{
        "active": "●" if r["active"] else "", "version": r["version"], "parent": r["parent"],
        "created (UTC)": fmt_time(r["created"]),
        "Val lung Dice": r["val_lung"], "Val infection Dice": r["val_infection"],
        "Val images": r["val_n"],
        "held-aside Dice (new / base)": (
            f"{r['held_score']:.3f} / {r['held_score_base']:.3f}"
            if r["held_score"] is not None and r["held_score_base"] is not None else None),
        "held-aside reading accuracy (new / base)": (
            f"{r['held_accuracy']:.2f} / {r['held_accuracy_base']:.2f}"
            if r["held_accuracy"] is not None and r["held_accuracy_base"] is not None else None),
        "held-aside reading ECE (new / base)": (
            f"{r['held_ece']:.3f} / {r['held_ece_base']:.3f}"
            if r["held_ece"] is not None and r["held_ece_base"] is not None else None),
        "annotation versions": r["annotations"] or None,
        "readings": r["readings"] or None,
        "train min": r["train_minutes"], "data hash": r["data_hash"],
        "decision": r["decision"],
    } for r in reversed(records)])
    st.dataframe(table, hide_index=True, width="stretch", placeholder=display.MISSING,
                 column_config={
        "Val lung Dice": st.column_config.NumberColumn(format="%.3f"),
        "Val infection Dice": st.column_config.NumberColumn(format="%.3f"),
        "train min": st.column_config.NumberColumn(format="%.1f"),
    })

    fig = go.Figure()
    x = [r["version"] for r in records]
    for key, name in (("val_lung", "Val lung Dice"), ("val_infection", "Val infection Dice "
                                                      "(COVID-19)"),
                      ("held_score", "held-aside corrections Dice")):
        fig.add_trace(go.Scatter(
            x=x, y=[r[key] for r in records], mode="lines+markers", name=name,
            customdata=[[r["val_n"], r["held_n"]] for r in records],
            hovertemplate="%{x}: %{y:.3f}<br>Val images %{customdata[0]}, held-aside "
                          "%{customdata[1]}<extra>" + name + "</extra>"))
    active = [r for r in records if r["active"]]
    if active and active[0]["val_lung"] is not None:
        fig.add_trace(go.Scatter(x=[active[0]["version"]], y=[active[0]["val_lung"]],
                                 mode="markers", name="active", marker={"size": 16,
                                 "symbol": "star", "color": "gold"}))
    fig.update_layout(height=360, margin={"t": 60, "b": 10}, yaxis={"title": "Dice",
                      "range": [0, 1]}, xaxis={"title": "version (oldest to newest)",
                      "type": "category"},
                      # above the plot: under it the legend covered the axis title
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0})
    st.plotly_chart(fig, width="stretch")
    st.caption("Val: the shipped model's numbers are on all of COVID-QU-Ex Val; fine-tuned "
               "versions are scored (with their base) on a fixed seeded Val subset (hover for "
               "sizes). Held-aside: corrected studies kept out of that run's training.")


def lineage_section(records: list[dict[str, Any]]) -> None:
    if not records:
        return
    st.subheader("Lineage")
    by_id = {r["id"]: r for r in records}
    ids = [r["id"] for r in reversed(records)]
    chosen = st.selectbox("Version", ids, format_func=lambda i: by_id[i]["version"],
                          key=SELECTED)
    chain, node = [], by_id.get(chosen)
    while node is not None and len(chain) < 50:
        chain.append(node["version"])
        node = by_id.get(node["parent_id"])
    st.markdown(" ← ".join(f"`{v}`" for v in chain) + "  (newest ← oldest)")
    r = by_id[chosen]
    lin = r["lineage"]
    if lin.get("source") == "finetune":
        c1, c2, c3 = st.columns(3)
        c1.metric("annotation versions trained on", len(lin.get("annotation_version_ids", [])))
        c2.metric("studies held aside", len(lin.get("held_aside_image_ids", [])))
        c3.metric("replay images per batch", (lin.get("replay") or {}).get("per_batch", 0))
        st.caption(f"Data hash `{lin.get('data_hash', '')}` · base `{lin.get('base_version')}` · "
                   f"model file `{Path(r['checkpoint']).name}`")
    with st.expander("Lineage and metrics (JSON)"):
        st.json({"lineage": lin, "metrics": r["metrics"]}, expanded=False)


def activation_section(records: list[dict[str, Any]]) -> None:
    if not records:
        return
    st.subheader("Activate or roll back")
    by_id = {r["id"]: r for r in records}
    current = next((r for r in records if r["active"]), None)
    st.caption(f"Active now: **{current['version'] if current else 'none'}**. New studies are "
               "predicted by the active version; any version can be re-activated. Studies it "
               "has not seen yet are re-predicted in the background.")  # fmt: skip
    ids = [r["id"] for r in reversed(records)]
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    target = c1.selectbox("Version to make active", ids,
                          format_func=lambda i: by_id[i]["version"]
                          + ("  (rejected by the gate)" if by_id[i]["rejected"] else ""),
                          key="models.activate")  # fmt: skip
    record = by_id[target]
    is_active = current is not None and current["id"] == target
    clicked = c2.button("Activate", disabled=not can_manage() or is_active,
                        help=None if can_manage() else "Sign in as a researcher or admin.")
    if st.session_state.get(CONFIRM) not in (None, target):
        st.session_state.pop(CONFIRM, None)  # another version was picked meanwhile
    outcome = None
    if clicked:
        outcome = admin.activate(common.db, record, user_id())
        if outcome.needs_confirmation:
            st.session_state[CONFIRM] = target
    if st.session_state.get(CONFIRM) == target:
        reason = admin.rejection_reason(record)
        st.warning(f"**{record['version']} was rejected by the fine-tuning gate**: {reason}. "
                   "Activating it anyway replaces the active model for every study.",
                   icon=":material/gpp_maybe:")  # fmt: skip
        k1, k2, _ = st.columns([2, 1, 3])
        if k1.button("Activate it anyway", type="primary", key="models.confirm_activate"):
            st.session_state.pop(CONFIRM, None)
            outcome = admin.activate(common.db, record, user_id(),
                                     confirmed_rejection=True)
        if k2.button("Cancel", key="models.cancel_activate"):
            st.session_state.pop(CONFIRM, None)
            st.rerun()
    if outcome is not None and outcome.message:
        if not outcome.ok:
            st.error(outcome.message)
            return
        start_repredict()
        st.toast(outcome.message)
        st.rerun()


def start_repredict() -> None:
    """Re-predict with the active version (the service refuses anyone but a manager)."""
    info, loaded, _message = common.active_model()
    if info is not None and loaded is not None:
        with refusal_shown():
            admin.start_repredict(common.db, settings.database_url(), info, loaded, user_id())


@st.fragment(run_every="2s")
def repredict_section() -> None:
    info, loaded, message = common.active_model()
    if info is None or loaded is None:
        common.model_notice(message)
        return
    job = admin.repredict_progress(settings.database_url())
    total, missing = admin.missing_predictions(common.db)
    if job is not None and not job.finished:
        st.progress(job.done / max(job.total, 1),
                    text=f"Predicting studies with {job.version}: {job.done} of {job.total}")
        return
    if job is not None and job.failed:
        st.warning(f"{job.failed} studies could not be predicted with {job.version} "
                   "(their stored image could not be read).")  # fmt: skip
    st.caption(f"{total - len(missing)} of {total} studies have a prediction from "
               f"**{info.version}** (the worklist shows the active version's predictions).")
    noun = "study" if len(missing) == 1 else "studies"
    if st.button(f"Re-predict {len(missing)} {noun} with the active version",
                 disabled=not missing or not can_manage(), icon=":material/refresh:"):
        start_repredict()
        st.rerun(scope="fragment")


def start_section(run_list: list[dict[str, Any]]) -> None:
    st.subheader("Fine-tune on the corrections")
    n_studies, n_versions = admin.corrections_available(common.db)
    n_readings = admin.readings_available(common.db)
    busy = [r for r in run_list if r["status"] in ("queued", "running") and not admin.is_stale(r)]
    st.caption(f"{n_studies} studies with submitted or approved masks ({n_versions} mask "
               f"versions) and {n_readings} with a submitted or approved class reading "
               "(COVID-19 / Non-COVID / Normal; other findings and not assessable are not "
               "class targets). About 20% of the studies are held aside to judge the new model; "
               "COVID-QU-Ex Train is replayed so it does not forget. The new version becomes "
               "active only if it beats the active one on the held-aside studies and loses no "
               "more than the tolerance on COVID-QU-Ex Val.")
    with st.form("models.finetune", border=True):
        c1, c2, c3, c4 = st.columns(4)
        steps = c1.number_input("Steps", 10, 2000, FinetuneOptions.steps, step=10)
        replay = c2.number_input("Replay ratio", 0.0, 0.9, FinetuneOptions.replay_ratio,
                                 step=0.1)
        seed = c3.number_input("Seed", 0, 10_000, FinetuneOptions.seed)
        tol = c4.number_input("Val tolerance (Dice)", 0.0, 0.2, FinetuneOptions.tolerance,
                              step=0.005, format="%.3f")
        data = st.text_input("COVID-QU-Ex folder (replay and Val)", str(settings.shared_data_dir()))
        why = ("Sign in as a researcher or admin." if not can_manage()
               else "A run is already in progress." if busy
               else "Corrections on at least 2 studies are needed." if n_studies < 2 else None)
        go_ = st.form_submit_button("Start fine-tuning", type="primary", disabled=why is not None,
                                    icon=":material/model_training:")
    if why:
        st.caption(why)
    if go_ and why is None:
        started = admin.start_finetune(
            common.db, settings.database_url(), user_id(), int(steps), float(replay),
            int(seed), float(tol), data or None,
        )  # fmt: skip
        if not started.ok:
            st.error(started.message)
            return
        st.toast(started.message)
        st.rerun()


@st.fragment(run_every="2s")
def runs_panel() -> None:
    admin.reap()
    run_list = admin.run_records(common.db)
    if not run_list:
        st.caption("No fine-tuning runs yet.")
        return
    newest = run_list[0]
    seen = st.session_state.get(SEEN_RUN)
    state = (newest["id"], newest["status"])
    if seen is not None and seen != state and admin.is_finished(newest):
        st.session_state[SEEN_RUN] = state
        st.rerun(scope="app")  # a run finished: refresh the versions table and charts
    st.session_state[SEEN_RUN] = state
    if admin.is_finished(newest):  # in words: the table below is a canvas, not text
        made = f", made {newest['model_version']}" if newest["model_version"] else ""
        st.caption(f"Latest: run {newest['id']} "
                   f"{admin.RUN_STATUS_LABELS.get(newest['status'], newest['status'])} at "
                   f"{fmt_time(newest['finished'])}{made}.")  # fmt: skip
    for r in run_list[:3]:
        if r["status"] not in ("queued", "running"):
            continue
        if admin.is_stale(r):
            st.warning(f"Run {r['id']} stopped without reporting (the server or the machine "
                       "restarted, or it was killed); nothing was registered.",
                       icon=":material/warning:")  # fmt: skip
            if can_manage() and st.button("Mark as stopped", key=f"stale.{r['id']}"):
                with refusal_shown():
                    admin.mark_interrupted(common.db, r["id"], user_id())
                st.rerun(scope="app")
            continue
        c1, c2, c3 = st.columns([6, 1, 1], vertical_alignment="center")
        where = "" if admin.runs_here(r) else f" on {r['host']}"
        state = ("stop requested" if r["stop_requested"]
                 else admin.user_message(r["message"]) or r["status"])
        c1.progress(r["progress"], text=f"Run {r['id']}{where}: {state}"
                    f" ({100 * r['progress']:.0f}%)")  # fmt: skip
        if not can_manage() or not r["pid"]:
            continue
        if st.session_state.get(STOP) == r["id"]:
            if c2.button("Stop now", key=f"stop.yes.{r['id']}", type="primary",
                         help="The run ends and registers nothing"):  # fmt: skip
                with refusal_shown():
                    admin.stop_run(common.db, r, user_id())
                st.session_state.pop(STOP, None)
            if c3.button("Keep", key=f"stop.no.{r['id']}"):
                st.session_state.pop(STOP, None)
                st.rerun(scope="fragment")
        elif c2.button("Stop", key=f"stop.{r['id']}", icon=":material/stop:"):
            st.session_state[STOP] = r["id"]
            st.rerun(scope="fragment")
    st.dataframe(pd.DataFrame([{
        "Run": r["id"], "Status": admin.RUN_STATUS_LABELS.get(r["status"], r["status"]),
        "Progress": r["progress"], "Message": admin.user_message(r["message"]),
        "Started (UTC)": fmt_time(r["started"]),
        "Finished (UTC)": fmt_time(r["finished"]), "Model version": r["model_version"],
    } for r in run_list]), hide_index=True, width="stretch", placeholder=display.MISSING,
        column_config={
        "Progress": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0,
                                                    format="percent"),
    })  # fmt: skip


def export_section() -> None:
    """The corrected dataset as a COVID-QU-Ex ZIP (services.dataset_export), for researchers."""
    st.subheader("Dataset export")
    st.caption(
        "Every study whose lung and infection masks are approved (or submitted too), in the "
        "COVID-QU-Ex folder layout with a manifest.csv and README; class folders from the "
        "reading, else the model. Also: python -m services.dataset_export --out DIR."
    )
    c1, c2 = st.columns(2)
    submitted = c1.checkbox("Include submitted masks", key="models.export.submitted")
    split = c2.selectbox("Split", ["hash", *dataset_export.SPLITS], key="models.export.split",
                         help="hash: stable per patient (10 % Val, 10 % Test, rest Train).")
    may_export = identity.can_export(common.user())
    if st.button("Prepare dataset export", disabled=not may_export,
                 help=None if may_export else "Sign in as a radiologist, researcher or admin.",
                 icon=":material/folder_zip:", key="models.export.prepare"):
        options = dataset_export.ExportOptions(include_submitted=submitted, split=split)
        with st.spinner("Writing the export..."), refusal_shown():
            st.session_state["models.export.file"] = dataset_export.dataset_zip(
                common.db, user_id(), options
            )
    ready = st.session_state.get("models.export.file")
    if ready is not None and may_export:
        name, data, summary = ready
        left = sum(summary.left_out.values())
        st.success(f"{summary.total} studies exported" + (f", {left} left out (see the "
                   "README in the ZIP)." if left else "."))
        st.download_button("Download dataset export", data, file_name=name,
                           mime="application/zip", icon=":material/download:",
                           key="models.export.download", on_click=common.audit,
                           args=("export", None, f"dataset export: {summary.total} studies"))


def main() -> None:
    st.title("Models")
    records = admin.version_records(common.db)
    versions_section(records)
    lineage_section(records)
    activation_section(records)
    repredict_section()
    start_section(admin.run_records(common.db))
    st.subheader("Fine-tuning runs")
    runs_panel()
    export_section()


main()
