"""A plotly chart that keeps the user's zoom and pan when its figure changes (not a page).

Why not st.plotly_chart: Streamlit (1.67) derives the chart element's identity from the figure
itself, even with a ``key``, and the browser remounts a chart whose identity changed, so every
new opacity, window or Grad-CAM class drew a new plot and plotly's ``layout.uirevision`` had no
previous view to keep (streamlit/streamlit#16052 proposes a key-based identity; not released).

This component is keyed, so Streamlit keeps the same element and hands it each new figure; the
browser updates the same plot with ``Plotly.react``, which keeps every zoom and pan made by the
user while ``layout.uirevision`` stays the same (the standard plotly mechanism; nothing is sent
back to the server). plotly.js is the one Streamlit's own charts load (one copy per page), else
the bundle of the plotly package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly
import plotly.graph_objects as go
import streamlit as st
import streamlit.components.v1 as components_v1

# plotly.js as the browser finds it (URLs relative to the app). First choice: Streamlit's
# own chart module (its file name carries a build hash), which the page loads for any
# st.plotly_chart anyway and which sets window.Plotly as it runs.
_STREAMLIT_JS = Path(st.__file__).parent / "static" / "static" / "js"
_STREAMLIT_PLOTLY = next(
    (f"static/js/{p.name}" for p in sorted(_STREAMLIT_JS.glob("PlotlyChart.*.js"))), None
)
# Else the bundle that ships with the plotly package, through Streamlit's component file route
# (this component is registered for that route only and never rendered).
_plotly_js = components_v1.declare_component(
    "plotly_js", path=str(Path(plotly.__file__).parent / "package_data")
)
_PLOTLY_BUNDLE = f"component/{_plotly_js.name}/plotly.min.js"

_JS = """
// One plotly.js for the page: the copy Streamlit's own charts use (window.Plotly once its
// chart module has run), else plotly's own bundle. Two copies side by side fight over the page.
function loadPlotly(sources) {
  if (!window.__infmapPlotly) {
    window.__infmapPlotly = (async () => {
      if (!window.Plotly && sources.streamlit) {
        try { await import(new URL(sources.streamlit, document.baseURI).href); } catch (e) {}
      }
      if (window.Plotly) return window.Plotly;
      await new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = new URL(sources.bundle, document.baseURI).href;
        script.onload = resolve;
        script.onerror = () => reject(new Error(sources.bundle));
        document.head.appendChild(script);
      });
      return window.Plotly;
    })();
    window.__infmapPlotly.catch(() => { window.__infmapPlotly = null; });
  }
  return window.__infmapPlotly;
}

// Draw the newest figure, one draw at a time (a draw may start while another is under way).
// aria-busy is "true" from a new figure's arrival until it is on screen.
async function drawLatest(plot) {
  if (plot.__drawing) return;
  plot.__drawing = true;
  try {
    const Plotly = plot.__plotly || (plot.__plotly = await loadPlotly(plot.__next.plotly));
    while (plot.__drawn !== plot.__next) {
      const next = plot.__next;
      const figure = JSON.parse(next.figure);
      const style = getComputedStyle(plot);  // the app theme's text colour and font
      figure.layout.font = { color: style.color, family: style.fontFamily,
                             ...(figure.layout.font || {}) };
      await Plotly.react(plot, figure.data, figure.layout, next.config);
      plot.__drawn = next;
    }
    plot.setAttribute("aria-busy", "false");
  } catch (err) {
    plot.textContent = "The chart could not be drawn: " + err;
    plot.setAttribute("aria-busy", "false");
  } finally {
    plot.__drawing = false;
  }
}

export default function ({ data, parentElement }) {
  let plot = parentElement.querySelector(".infmap-plot");
  if (!plot) {
    plot = document.createElement("div");
    plot.className = "infmap-plot";
    parentElement.appendChild(plot);
  }
  if (plot.__next && plot.__next.figure === data.figure) return;  // a rerun, same figure
  plot.__next = data;
  plot.setAttribute("aria-busy", "true");
  drawLatest(plot);
}
"""

_chart = st.components.v2.component("infmap.panel_chart", js=_JS, isolate_styles=False)


def kept_view_chart(fig: go.Figure, key: str, config: dict[str, Any] | None = None) -> None:
    """Show ``fig``; zoom and pan made by the user are kept across reruns for as long as
    ``fig.layout.uirevision`` is unchanged (set it per what is being viewed, e.g. a study)."""
    if fig.layout.uirevision is None:
        raise ValueError("kept_view_chart needs layout.uirevision: the view is kept per value")
    # The page's background shows through; the browser gives the text the app theme's colour.
    fig.update_layout(paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)", autosize=True)
    config = {"responsive": True, **(config or {})}
    # No "share chart" button: nothing is sent off this machine (st.plotly_chart hides it too).
    removed = [*config.get("modeBarButtonsToRemove", []), "sendChartToCloud"]
    config["modeBarButtonsToRemove"] = removed
    _chart(
        data={
            "figure": fig.to_json(),  # plotly's encoder (numpy arrays, dates)
            "config": config,
            "plotly": {"streamlit": _STREAMLIT_PLOTLY, "bundle": _PLOTLY_BUNDLE},
        },
        key=key,
        width="stretch",
        height="content",
    )

