"""Issue 16.9's small things that had no test: run messages without signal names or server
paths, probability labels outside their bars and upright, the mode bar clear of the panel
titles."""

from __future__ import annotations

import numpy as np

from services import display, model_admin


def test_run_messages_name_no_signal_and_no_server_path() -> None:
    shown = model_admin.user_message(
        "interrupted (SIGTERM) while writing /srv/infmap/data/models/finetune-run3.pt"
    )
    assert "SIG" not in shown and "/srv" not in shown, shown
    assert "stopped on request" in shown and "finetune-run3.pt" in shown
    assert "SIGKILL" not in model_admin.user_message("killed by SIGKILL")
    assert model_admin.RUN_STATUS_LABELS["interrupted"] == "stopped"


def test_probability_labels_sit_upright_outside_thin_bars() -> None:
    fig = display.probabilities_figure({"COVID-19": 0.082, "Non-COVID": 0.5, "Normal": 0.418})
    bar = fig.data[0]
    assert bar.textposition == "outside" and bar.textangle == 0 and bar.cliponaxis is False
    assert list(bar.text) == ["8.2%", "50.0%", "41.8%"]
    assert fig.layout.margin.r >= 40  # room for the label of a full bar


def test_mode_bar_has_its_own_row_above_the_panel_titles() -> None:
    pixels = np.zeros((256, 256), np.float32)
    grid = display.DisplayGrid.for_shape(*pixels.shape)
    mask = np.zeros(pixels.shape, bool)
    fig = display.panels_figure(display.panel_images(pixels, mask, mask, pixels, 0.4, grid), grid)
    titles = [a for a in fig.layout.annotations if a.text in display.PANEL_TITLES]
    assert len(titles) == 4 and all(a.yanchor == "bottom" for a in titles)
    assert fig.layout.margin.t >= 50  # titles sit on the plot's top edge; the mode bar above
