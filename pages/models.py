"""Models: versions with metrics and lineage, fine-tuning on the corrections, activation.

Thin page: the work is ``training.finetune`` (run as a detached background process that reports
into ``finetune_runs``), ``database.model_versions`` and ``database.runs`` (versions, runs,
activation) and ``services.ingest.ensure_prediction`` (re-predicting studies with the active
version).
"""

from __future__ import annotations

import contextlib
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import settings
from database import annotations, model_versions, runs
from database.session import data_dir_for
from pages import common
from services import ingest, studies
from training import finetune as ft

MANAGERS = ("radiologist", "researcher")  # who may start fine-tuning and change the model
SELECTED = "models.version"
SEEN_RUN = "models.seen_run"


@st.cache_resource(show_spinner=False)
def _children() -> dict[int, Any]:
    """Popen objects of runs started by this server, polled so finished ones are reaped."""
    return {}


def reap() -> None:
    children = _children()
    for run_id, proc in list(children.items()):
        if proc.poll() is not None:
            children.pop(run_id, None)


def can_manage() -> bool:
    u = common.user()
    return u is not None and u.role in MANAGERS


def dice(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None


# ----------------------------------------------------------------------------- reading
def version_records() -> list[dict[str, Any]]:
    with common.db(write=False) as s:
        rows = model_versions.list_model_versions(s)
        names = {r.id: r.version for r in rows}
        out = []
        for r in reversed(rows):  # oldest first
            m, lin = dict(r.metrics or {}), dict(r.lineage or {})
            val, corr = m.get("val") or {}, m.get("corrections") or {}
            base_corr = (m.get("base") or {}).get("corrections") or {}
            out.append({
                "id": r.id, "version": r.version, "active": bool(r.active),
                "parent": names.get(r.parent_id, ""), "parent_id": r.parent_id,
                "created": r.created, "train_minutes": r.train_minutes,
                "val_lung": dice(val.get("lung_dice")),
                "val_infection": dice(val.get("infection_dice_covid")),
                "val_n": val.get("n_images"),
                "held_score": dice(corr.get("score")),
                "held_score_base": dice(base_corr.get("score")),
                "held_n": corr.get("n_images"),
                "annotations": len(lin.get("annotation_version_ids") or []),
                "data_hash": (lin.get("data_hash") or "")[:12],
                "decision": ((m.get("decision") or {}).get("reason") or lin.get("source") or ""),
                "checkpoint": r.checkpoint_path, "lineage": lin, "metrics": m,
            })
        return out


def corrections_available() -> tuple[int, int]:
    """(studies, annotation versions) that a fine-tuning run would use now."""
    with common.db(write=False) as s:
        versions = annotations.training_annotations(s)
        return len({v.image_id for v in versions}), len(versions)


def run_records(limit: int = 10) -> list[dict[str, Any]]:
    with common.db(write=False) as s:
        return [{
            "id": r.id, "status": r.status, "progress": float(r.progress or 0.0),
            "message": r.message or "", "pid": r.pid, "created": r.created,
            "started": r.started, "finished": r.finished,
            "model_version": r.model_version.version if r.model_version else "",
        } for r in runs.list_runs(s, limit=limit)]


def is_stale(run: dict[str, Any]) -> bool:
    """A run the database calls running whose process is gone (killed, machine restarted)."""
    if run["status"] == "running":
        return not ft.process_alive(run["pid"])
    if run["status"] == "queued":  # never picked up within a minute
        age = (datetime.now(UTC) - run["created"]).total_seconds()
        return age > 60 and not ft.process_alive(run["pid"])
    return False


# ----------------------------------------------------------------------------- sections
def versions_section(records: list[dict[str, Any]]) -> None:
    st.subheader("Model versions")
    if not records:
        st.info("No model version is registered yet.")
        return
    table = pd.DataFrame([{
        "active": "●" if r["active"] else "", "version": r["version"], "parent": r["parent"],
        "created (UTC)": common.fmt_time(r["created"]),
        "Val lung Dice": r["val_lung"], "Val infection Dice": r["val_infection"],
        "Val images": r["val_n"],
        "held-aside Dice (new / base)": (
            f"{r['held_score']:.3f} / {r['held_score_base']:.3f}"
            if r["held_score"] is not None and r["held_score_base"] is not None else ""),
        "annotation versions": r["annotations"] or None,
        "train min": r["train_minutes"], "data hash": r["data_hash"],
        "decision": r["decision"],
    } for r in reversed(records)])
    st.dataframe(table, hide_index=True, width="stretch", column_config={
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
    fig.update_layout(height=340, margin={"t": 30, "b": 10}, yaxis={"title": "Dice",
                      "range": [0, 1]}, xaxis={"title": "version (oldest to newest)",
                      "type": "category"}, legend={"orientation": "h"})
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
                   f"checkpoint `{r['checkpoint']}`")
    with st.expander("Lineage and metrics (JSON)"):
        st.json({"lineage": lin, "metrics": r["metrics"]}, expanded=False)


def activation_section(records: list[dict[str, Any]]) -> None:
    if not records:
        return
    st.subheader("Activate or roll back")
    by_id = {r["id"]: r for r in records}
    current = next((r for r in records if r["active"]), None)
    st.caption(f"Active now: **{current['version'] if current else 'none'}**. New studies are "
               "predicted by the active version; any version can be re-activated.")
    ids = [r["id"] for r in reversed(records)]
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    target = c1.selectbox("Version to make active", ids,
                          format_func=lambda i: by_id[i]["version"], key="models.activate")
    if c2.button("Activate", disabled=not can_manage() or (current and current["id"] == target),
                 help=None if can_manage() else "Sign in as a radiologist or researcher."):
        if not Path(by_id[target]["checkpoint"]).is_file():
            st.error("This version's checkpoint file is missing; it cannot be activated.")
            return
        with common.db() as s:
            model_versions.set_active_model_version(s, target)
        st.toast(f"{by_id[target]['version']} is now the active model.")
        st.rerun()


def repredict_section() -> None:
    info, loaded, message = common.active_model()
    if info is None or loaded is None:
        common.model_notice(message)
        return
    rows = studies.worklist(common.db)
    missing = [r.image_id for r in rows if r.prediction_id is None]
    st.caption(f"{len(rows) - len(missing)} of {len(rows)} studies have a prediction from "
               f"**{info.version}** (the worklist shows the active version's predictions).")
    if st.button(f"Re-predict {len(missing)} studies with the active version",
                 disabled=not missing or not can_manage(), icon=":material/refresh:"):
        handle = ingest.ModelHandle(info.id, info.version, loaded)
        bar = st.progress(0.0)
        failed = 0
        for i, image_id in enumerate(missing, start=1):
            bar.progress(i / len(missing), text=f"Study #{image_id} ({i}/{len(missing)})")
            try:
                ingest.ensure_prediction(common.db, image_id,
                                         studies.load_xray_payload(common.db, image_id), handle)
            except Exception:  # one broken payload must not stop the rest
                common.log.exception("re-predict failed for image %s", image_id)
                failed += 1
        bar.empty()
        st.toast(f"Re-predicted {len(missing) - failed} studies" +
                 (f"; {failed} failed (see the server log)" if failed else ""))
        st.rerun()


def start_section(runs: list[dict[str, Any]]) -> None:
    st.subheader("Fine-tune on the corrections")
    n_studies, n_versions = corrections_available()
    busy = [r for r in runs if r["status"] in ("queued", "running") and not is_stale(r)]
    st.caption(f"{n_studies} studies with submitted or approved masks ({n_versions} mask "
               "versions). About 20% of the studies are held aside to judge the new model; "
               "COVID-QU-Ex Train is replayed so it does not forget. The new version becomes "
               "active only if it beats the active one on the held-aside studies and loses no "
               "more than the tolerance on COVID-QU-Ex Val.")
    with st.form("models.finetune", border=True):
        c1, c2, c3, c4 = st.columns(4)
        steps = c1.number_input("Steps", 10, 2000, ft.FinetuneOptions.steps, step=10)
        replay = c2.number_input("Replay ratio", 0.0, 0.9, ft.FinetuneOptions.replay_ratio,
                                 step=0.1)
        seed = c3.number_input("Seed", 0, 10_000, ft.FinetuneOptions.seed)
        tol = c4.number_input("Val tolerance (Dice)", 0.0, 0.2, ft.FinetuneOptions.tolerance,
                              step=0.005, format="%.3f")
        data = st.text_input("COVID-QU-Ex folder (replay and Val)", str(ft.DEFAULT_DATA))
        why = ("Sign in as a radiologist or researcher." if not can_manage()
               else "A run is already in progress." if busy
               else "Corrections on at least 2 studies are needed." if n_studies < 2 else None)
        go_ = st.form_submit_button("Start fine-tuning", type="primary", disabled=why is not None,
                                    icon=":material/model_training:")
    if why:
        st.caption(why)
    if go_ and why is None:
        url = settings.database_url()
        args = {"steps": int(steps), "replay_ratio": float(replay), "seed": int(seed),
                "tolerance": float(tol), "data": data or None, "by": common.user().name}
        with common.db() as s:
            run_id = int(runs.create_run(s, args).id)
        folder = data_dir_for(url) / "models"
        folder.mkdir(parents=True, exist_ok=True)
        extra = ["--steps", str(int(steps)), "--replay-ratio", str(float(replay)),
                 "--seed", str(int(seed)), "--tolerance", str(float(tol))]
        if data:
            extra += ["--data", data]
        try:
            proc = ft.launch_background(url, run_id, folder / f"finetune-run{run_id}.pt", extra,
                                        log_path=folder / f"finetune-run{run_id}.log")
        except OSError as exc:
            with common.db() as s:
                runs.finish_run(s, run_id, "failed", message=f"could not start: {exc}")
            st.error(f"The fine-tuning process could not be started: {exc}")
            return
        _children()[run_id] = proc
        st.toast(f"Fine-tuning run {run_id} started in the background.")
        st.rerun()


@st.fragment(run_every="2s")
def runs_panel() -> None:
    reap()
    runs = run_records()
    if not runs:
        st.caption("No fine-tuning runs yet.")
        return
    newest = runs[0]
    seen = st.session_state.get(SEEN_RUN)
    state = (newest["id"], newest["status"])
    if seen is not None and seen != state and newest["status"] in runs.FINISHED_RUN_STATUSES:
        st.session_state[SEEN_RUN] = state
        st.rerun(scope="app")  # a run finished: refresh the versions table and charts
    st.session_state[SEEN_RUN] = state
    for r in runs[:3]:
        if r["status"] in ("queued", "running"):
            if is_stale(r):
                st.warning(f"Run {r['id']}: its process is gone (killed or the machine "
                           "restarted); nothing was registered.", icon=":material/warning:")
                if can_manage() and st.button("Mark as interrupted", key=f"stale.{r['id']}"):
                    with common.db() as s:
                        runs.finish_run(s, r["id"], "interrupted",
                                        message="process ended without reporting (killed?)")
                    st.rerun(scope="app")
            else:
                c1, c2 = st.columns([6, 1], vertical_alignment="center")
                c1.progress(r["progress"], text=f"Run {r['id']}: {r['message'] or r['status']}"
                            f" ({100 * r['progress']:.0f}%)")
                if can_manage() and r["pid"] and c2.button("Stop", key=f"stop.{r['id']}",
                                                           icon=":material/stop:"):
                    # The run catches SIGTERM, marks itself interrupted, registers nothing.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(r["pid"]), signal.SIGTERM)
    st.dataframe(pd.DataFrame([{
        "run": r["id"], "status": r["status"], "progress": r["progress"],
        "message": r["message"], "started (UTC)": common.fmt_time(r["started"]),
        "finished (UTC)": common.fmt_time(r["finished"]), "model version": r["model_version"],
    } for r in runs]), hide_index=True, width="stretch", column_config={
        "progress": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0,
                                                    format="percent"),
    })


def main() -> None:
    st.title("Models")
    records = version_records()
    versions_section(records)
    lineage_section(records)
    activation_section(records)
    repredict_section()
    start_section(run_records())
    st.subheader("Fine-tuning runs")
    runs_panel()
    st.caption(f"Run logs: `{data_dir_for(settings.database_url()) / 'models'}`; "
               f"server pid {os.getpid()}.")


main()
