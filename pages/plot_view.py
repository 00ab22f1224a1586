"""Keeping a plotly chart's zoom and pan across reruns that change the figure (not a page).

``st.plotly_chart`` derives the element's identity from the figure itself, so any change (a new
overlay opacity, window or Grad-CAM class) mounts a new chart and plotly's ``uirevision`` has
nothing to carry the view over to. This invisible component watches the chart's
``plotly_relayout`` events in the browser and reports the axis ranges back; the page then puts
those ranges into the next figure, so the view survives. A double-click (autorange) clears it.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import streamlit as st

_JS = """
export default function (component) {
  const { data, parentElement, setStateValue } = component;
  const state = parentElement.__infmapView || (parentElement.__infmapView = {});
  state.data = data;
  const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
  const round = (r) => r.map((v) => Math.round(v * 10) / 10);
  const report = (gd) => {
    const x = gd._fullLayout.xaxis, y = gd._fullLayout.yaxis;
    const view = x.autorange && y.autorange ? null : { x: round(x.range), y: round(y.range) };
    const applied = state.data.view ? { x: round(state.data.view.x), y: round(state.data.view.y) }
                                    : null;
    if (!same(view, applied) && !same(view, state.sent)) {
      state.sent = view;
      setStateValue("view", view ? { ...view, target: state.data.target } : null);
    }
  };
  const attach = () => {
    const gd = document.querySelector(`.st-key-${state.data.chart} .js-plotly-plot`);
    if (!gd || gd === state.gd || typeof gd.on !== "function") return;
    state.gd = gd;
    gd.on("plotly_relayout", () => {
      clearTimeout(state.timer);
      state.timer = setTimeout(() => report(gd), 400);  // one report per gesture
    });
  };
  attach();
  clearInterval(state.poll);
  state.poll = setInterval(attach, 250);  // a changed figure is a new chart element
  return () => { clearInterval(state.poll); clearTimeout(state.timer); };
}
"""

_view_component = st.components.v2.component(
    "infmap.plot_view", html="<span></span>", js=_JS, isolate_styles=True
)


def kept_view(chart_key: str, target: str, key: str) -> dict[str, Any] | None:
    """The last zoom/pan the user made on the chart keyed ``chart_key`` while it showed
    ``target`` (e.g. a study id), or None (the full view)."""
    previous = st.session_state.get(f"{key}.applied")
    result = _view_component(
        data={"chart": chart_key.replace(".", "-"), "target": target, "view": previous},
        key=key,
        default={"view": None},
        on_view_change=lambda: None,
        width="content",
        height="content",
    )
    view = result.get("view") if result else None
    if not view or view.get("target") != target:
        view = None
    st.session_state[f"{key}.applied"] = view
    return view


def apply_view(fig: go.Figure, view: dict[str, Any] | None) -> None:
    """Put a kept view into every (matched) axis of the figure."""
    if view is None:
        return
    fig.update_xaxes(range=list(view["x"]), autorange=False)
    fig.update_yaxes(range=list(view["y"]), autorange=False)
