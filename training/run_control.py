"""Fine-tuning runs as processes: the run row's lifecycle and progress, signals, and the app's
detached launcher with its liveness check.

SIGTERM/SIGINT become ``Interrupted`` while a run works (``signals_raise``) and are held back
around the final commit (``signals_blocked``) so registration and bookkeeping happen together.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

import settings
from database import runs
from database.session import session_scope


class Interrupted(BaseException):
    """SIGTERM/SIGINT arrived: stop, mark the run interrupted, register nothing."""


class FinetuneError(RuntimeError):
    """The run cannot start or finish (no corrections, no base model, ...); a human message."""


@contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into ``Interrupted`` for the duration (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back (delivered on exit) so a commit and the bookkeeping that
    follows it happen together."""
    sigs = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Progress:
    """tqdm on the terminal plus throttled writes of (fraction, message) to the run row.
    ``engine=None``: the terminal only (a torchrun process other than rank 0)."""

    def __init__(
        self, engine: Any, run_id: int | None, show: bool, min_interval: float = 1.0
    ) -> None:
        self.engine, self.run_id, self.show = engine, run_id, show
        self.min_interval = min_interval
        self._last = 0.0

    def update(self, fraction: float, message: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.engine is None or self.run_id is None:
            return
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        try:
            with session_scope(self.engine) as s:
                run = runs.update_run_progress(s, self.run_id, min(1.0, max(0.0, fraction)),
                                               message)
                stop = bool(run.stop_requested)
        except ValueError as exc:  # someone marked the run finished (the app's stale-run button)
            raise Interrupted(f"run marked finished elsewhere: {exc}") from exc
        except Exception as exc:  # a busy database must not kill the run; the next one retries
            if force:
                raise
            print(f"progress not recorded: {exc}", file=sys.stderr)
            return
        if stop:
            raise Interrupted("stop requested")

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not self.show, mininterval=2, leave=False,
                    file=sys.stderr)


def start_run(engine: Any, run_id: int | None, args: dict[str, Any]) -> int:
    """Adopt the queued run the app created (``--run-id``) or create one; mark it running."""
    with session_scope(engine) as s:
        if run_id is not None:
            run = runs.get_run(s, run_id)
            if run is None:
                raise FinetuneError(f"there is no fine-tune run {run_id}")
            if run.status != "queued":
                raise FinetuneError(f"fine-tune run {run_id} is already {run.status}; "
                                    "start a new run to try again")
        else:
            run = runs.create_run(s, args)
        runs.update_run_progress(s, run.id, 0.0, "starting", pid=os.getpid(), host=this_host())
        return int(run.id)


def this_host() -> str:
    """The name a run's machine is known by: its pid is checked only on that machine."""
    return socket.gethostname()


HEARTBEAT_SECONDS = 10.0


class Heartbeat:
    """A daemon thread that tells the run row every ``interval`` seconds that the run is alive
    (evaluations can go minutes without a progress update), and turns a stop request recorded
    by any app server into SIGTERM to this process: the same path as the app's own Stop
    (``signals_raise``; held back around the final commit). A row marked finished ends the
    beats; the run's next progress update raises ``Interrupted`` for it."""

    def __init__(self, engine: Any, run_id: int, interval: float = HEARTBEAT_SECONDS) -> None:
        self.engine, self.run_id, self.interval = engine, run_id, interval
        # Only where signals_raise turns SIGTERM into Interrupted (the main thread); elsewhere
        # the next progress update sees the request instead.
        self._may_signal = threading.current_thread() is threading.main_thread()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}",
                                        daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=self.interval + 5)

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            try:
                with session_scope(self.engine) as s:
                    stop = runs.beat(s, self.run_id)
            except ValueError:  # finished: by the run itself, or marked so (updates see it)
                return
            except Exception as exc:  # a busy database: the next beat retries
                print(f"heartbeat not recorded: {exc}", file=sys.stderr)
                continue
            if stop and self._may_signal and not self._done.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
                return


def finish_failed(engine: Any, run_id: int, status: str, message: str) -> None:
    try:
        with session_scope(engine) as s:
            run = runs.get_run(s, run_id)
            if run is not None and run.status not in runs.FINISHED_RUN_STATUSES:
                runs.finish_run(s, run_id, status, message=message[:2000])
    except Exception as exc:  # the database itself may be what failed
        print(f"could not mark run {run_id} {status}: {exc}", file=sys.stderr)


def launch_background(
    db_url: str, run_id: int, out: str | Path, extra_args: Sequence[str] = (),
    log_path: str | Path | None = None,
) -> Any:
    """Start ``python -m training.finetune`` detached (own session, output to ``log_path``) for
    a queued run row; returns the ``Popen``. The caller never waits: progress is in the row."""
    import subprocess

    cmd = [sys.executable, "-m", "training.finetune", "--db", db_url, "--out", str(out),
           "--run-id", str(run_id), *extra_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(settings.REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, cwd=settings.REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()  # the child has its own copy of the descriptor


def process_alive(pid: int | None) -> bool:
    """Whether a process with this id is running (a zombie counts as gone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
