"""Fine-tuning runs seen from an app server on another machine (issue 13.2): the server judges a
run on its own machine by the process id, and one elsewhere by its heartbeat; it never signals
a process id from another machine, and a stop request reaches the run through the database."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from database import runs, users
from database.session import session_scope
from services import model_admin
from training import run_control

PASSWORD = "liveness-test-password"


def _scope(engine: Engine):  # noqa: ANN202
    def scope(write: bool = True):  # noqa: ANN202
        return session_scope(engine, write=write)

    return scope


def _running(engine: Engine, host: str | None, pid: int) -> dict:
    with session_scope(engine) as s:
        run_id = runs.create_run(s).id
        runs.update_run_progress(s, run_id, 0.2, "fine-tuning: step 2/10", pid=pid, host=host)
    return next(r for r in model_admin.run_records(_scope(engine)) if r["id"] == run_id)


def _dead_pid() -> int:
    pid = 2**22 - 7  # above Linux's default pid_max: no process has it
    assert not run_control.process_alive(pid)
    return pid


def test_a_run_on_another_machine_is_judged_by_its_heartbeat(engine: Engine) -> None:
    remote = _running(engine, "trainer-elsewhere", _dead_pid())  # that pid means nothing here
    assert not model_admin.runs_here(remote)
    assert not model_admin.is_stale(remote)  # it beat just now
    silent = dict(remote, heartbeat=datetime.now(UTC) - timedelta(
        seconds=model_admin.REMOTE_SILENCE_SECONDS + 1))
    assert model_admin.is_stale(silent)

    local_dead = _running(engine, run_control.this_host(), _dead_pid())
    assert model_admin.runs_here(local_dead) and model_admin.is_stale(local_dead)
    local_alive = _running(engine, run_control.this_host(), os.getpid())
    assert not model_admin.is_stale(local_alive)
    legacy = _running(engine, None, _dead_pid())  # recorded before runs had a host: local
    assert model_admin.runs_here(legacy) and model_admin.is_stale(legacy)


def test_stop_of_a_run_elsewhere_is_a_request_not_a_signal(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with session_scope(engine) as s:
        researcher = int(users.create_user(s, "Rita Researcher", "researcher", PASSWORD,
                                           by=None).id)
    remote = _running(engine, "trainer-elsewhere", os.getpid())  # the same number as ours
    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr(model_admin.os, "kill", lambda pid, sig: signalled.append((pid, sig)))
    model_admin.stop_run(_scope(engine), remote, researcher)
    assert signalled == []  # not this process, which only shares the number
    with session_scope(engine) as s:
        assert runs.beat(s, remote["id"]) is True  # the run reads the request at its next beat
    listed = next(r for r in model_admin.run_records(_scope(engine)) if r["id"] == remote["id"])
    assert listed["stop_requested"]

    local = _running(engine, run_control.this_host(), 424242)
    model_admin.stop_run(_scope(engine), local, researcher)
    assert [pid for pid, _ in signalled] == [424242]  # here: at once, and recorded too
    with session_scope(engine, write=False) as s:
        assert runs.get_run(s, local["id"]).stop_requested
