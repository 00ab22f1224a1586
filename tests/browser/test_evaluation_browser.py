"""Issue 11.5 in real Chromium: the Evaluation page runs the active model on the bundled
samples with a progress bar and shows its figures; a worst case opens in Review."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser


def test_evaluation_page_runs_on_the_samples_and_shows_its_plots(new_page, shot) -> None:  # noqa: ANN001
    page = new_page("/evaluation")
    expect(page.get_by_role("heading", name="Evaluation")).to_be_visible()
    expect(page.get_by_role("textbox", name="Labelled folder")).to_have_value("samples")
    page.get_by_role("button", name="Run evaluation").click()
    expect(page.get_by_role("heading", name=re.compile(r"samples: 6 images"))).to_be_visible()
    charts = page.locator('[data-testid="stPlotlyChart"]')
    expect(charts).to_have_count(5)
    for title in ("Confusion matrix", "ROC, one class against the rest", "Reliability",
                  "Per-image Dice", "Risk-coverage"):
        expect(charts.get_by_text(re.compile(re.escape(title))).first).to_be_visible()
    expect(page.get_by_role("button", name="metrics.json")).to_be_visible()
    expect(page.get_by_role("button", name="confusion_matrix.json")).to_be_visible()
    shot(page, "evaluation-samples")

    page.get_by_role("button", name="Open in Review").first.click()
    expect(page.get_by_role("heading", name="Review")).to_be_visible()


def test_evaluation_page_refuses_a_missing_folder(new_page) -> None:  # noqa: ANN001
    page = new_page("/evaluation")
    field = page.get_by_role("textbox", name="Labelled folder")
    field.fill("/no/such/folder")
    field.press("Enter")
    page.get_by_role("button", name="Run evaluation").click()
    expect(page.get_by_text("There is no folder at /no/such/folder.")).to_be_visible()
    expect(page.locator('[data-testid="stPlotlyChart"]')).to_have_count(0)
