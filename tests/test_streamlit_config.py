"""The app's Streamlit settings that its behaviour depends on (.streamlit/config.toml): each was
chosen for a reason found in use, and a default coming back would undo it without a failure."""

from __future__ import annotations

import tomllib

import settings

CONFIG = tomllib.loads((settings.REPO_ROOT / ".streamlit" / "config.toml").read_text())


def test_no_full_garbage_collection_after_every_script_run() -> None:
    # With torch loaded, gc.collect(2) after each run cost about 0.5 s, two thirds of the
    # server's time per click on the correction canvas (py-spy): 3.0 s -> 1.2 s per click.
    assert CONFIG["runner"]["postScriptGC"] is False


def test_a_rerun_waits_for_the_running_script() -> None:
    assert CONFIG["runner"]["fastReruns"] is False  # see the comment in config.toml


def test_users_never_see_tracebacks_and_forged_posts_are_refused() -> None:
    assert CONFIG["client"]["showErrorDetails"] == "none"
    assert CONFIG["server"]["enableXsrfProtection"] is True
    assert CONFIG["server"]["address"] == "localhost"
    assert CONFIG["browser"]["gatherUsageStats"] is False
