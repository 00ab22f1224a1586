"""Decode each file in a throw-away worker process with a hard time and memory budget.

A decoder can loop forever (pydicom's JPEG 2000 box parser on a zero-length box), crash, or
allocate whatever a forged header declares. A thread cannot be stopped, so every file that comes
from outside is decoded in its own process, limited with ``RLIMIT_AS`` to its memory budget and
killed when its time is up. Whatever happens there, the caller gets the result or
``UnsupportedImage`` with a message for the person who gave the file; unexpected failures are
logged with their traceback (code locations and the exception type only: messages can quote
header values).

Workers are forked by a *zygote*: a single-threaded process (``python -m inference.isolation``)
started on first use with the decoders already imported, so a worker costs a fork (milliseconds),
not a Python start-up. It is this module's own small forkserver because multiprocessing's
re-imports the parent's ``__main__`` in every worker: under Streamlit that is the app script, and
for the batch CLI it pulls in torch. Each worker talks to the caller over its own socket pair
(passed to the zygote with ``SCM_RIGHTS``); the zygote only forks and reports the worker's pid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import settings
from inference import limits
from inference.checks import COULD_NOT_READ, UnsupportedImage, traceback_summary
from inference.loading import XRay, load_xray

log = logging.getLogger(__name__)

T = TypeVar("T")

# Imported once in the zygote, so each worker starts with them loaded.
PRELOAD = ("numpy", "cv2", "PIL.Image", "pydicom", "inference.loading", "inference.dicom")
_PID = struct.Struct("!i")


def _timeout_message(seconds: float) -> str:
    return (
        f"Reading this file took longer than {seconds:g} seconds, so it was stopped; the file may "
        "be damaged or crafted to stall the decoder."
    )


def _memory_message(memory_bytes: int) -> str:
    return (
        f"Reading this file needed more than the {memory_bytes / 2**30:.1f} GB of memory allowed "
        "for one image, so it was stopped; the file may be damaged or far larger than a chest "
        "X-ray."
    )


@dataclass(frozen=True)
class Budget:
    """What one file may cost: wall-clock seconds, and bytes of memory beyond the worker's start."""

    seconds: float = field(default_factory=settings.decode_seconds)
    memory_bytes: int = field(default_factory=limits.decode_memory_bytes)


# --------------------------------------------------------------------------------- the caller


class _Zygote:
    """The caller's handle on the zygote process: started lazily, restarted if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # The worker unpickles the caller's function by reference: give it the caller's path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "inference.isolation", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self._control = ours

    def fork_worker(self) -> tuple[Connection, int]:
        """A new worker: (connection to it, its pid)."""
        with self._lock:
            for attempt in (1, 2):
                if self._process is None or self._process.poll() is not None:
                    self._start()
                assert self._control is not None
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    socket.send_fds(self._control, [b"F"], [theirs.fileno()])
                    reply = self._control.recv(_PID.size, socket.MSG_WAITALL)
                    if len(reply) != _PID.size:
                        raise ConnectionError("the zygote closed its socket")
                except OSError:
                    ours.close()
                    if attempt == 2:
                        raise
                    log.warning("decoding zygote died; starting a new one")
                    self._process = None
                    continue
                finally:
                    theirs.close()
                (pid,) = _PID.unpack(reply)
                return Connection(ours.detach()), pid
        raise AssertionError("unreachable")


_ZYGOTE = _Zygote()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have gone already
        os.kill(pid, signal.SIGKILL)


def run_isolated(func: Callable[..., T], *args: Any, budget: Budget | None = None) -> T:
    """``func(*args)`` in a worker process within ``budget``; raises ``UnsupportedImage`` when it
    is refused, runs out of time or memory, crashes or fails unexpectedly. ``func``, its
    arguments and its result must be picklable (``func`` a module-level function)."""
    budget = budget or Budget()
    conn, pid = _ZYGOTE.fork_worker()
    done = False
    try:
        try:
            conn.send((func, args, budget))
            if not conn.poll(budget.seconds):
                log.warning("decoding stopped after %g s (time budget)", budget.seconds)
                raise UnsupportedImage(_timeout_message(budget.seconds))
            status, value = conn.recv()
            done = True
        except (EOFError, OSError):  # it died without a word: a crash, or killed for CPU time
            log.error("decoding worker %d died", pid)
            raise UnsupportedImage(COULD_NOT_READ) from None
    finally:
        conn.close()
        if not done:
            _kill(pid)
    if status == "ok":
        return value
    if status == "refused":
        raise UnsupportedImage(value)
    if status == "memory":
        log.warning("decoding stopped: over the memory budget of %d MB", budget.memory_bytes >> 20)
        raise UnsupportedImage(_memory_message(budget.memory_bytes))
    log.error("decoding failed in the worker:\n%s", value)
    raise UnsupportedImage(COULD_NOT_READ)


def load_xray_isolated(
    source: str | Path | bytes, name: str | None = None, budget: Budget | None = None
) -> XRay:
    """``inference.loading.load_xray`` in a worker process within ``budget`` (see above)."""
    if isinstance(source, str):
        source = Path(source)
    return run_isolated(load_xray, source, name, budget=budget)


# --------------------------------------------------------------------------------- the worker


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * resource.getpagesize()


def _limit_resources(budget: Budget) -> None:
    """Cap the address space at what the worker uses now plus the budget; cap CPU time as a
    backstop should the caller die without killing it (the J2K loop spins at 100 % CPU)."""
    limit = _address_space_bytes() + budget.memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cpu = int(budget.seconds * 2) + 5
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    # The loader estimates a file's memory from its header against this budget.
    os.environ["INFMAP_DECODE_MEMORY_MB"] = str(budget.memory_bytes / 2**20)


def _work(conn: Connection) -> None:
    try:
        func, args, budget = conn.recv()
    except (EOFError, OSError):
        return  # the caller gave up before sending
    try:
        _limit_resources(budget)
        outcome: tuple[str, Any] = ("ok", func(*args))
    except UnsupportedImage as exc:
        outcome = ("refused", str(exc))
    except MemoryError:
        outcome = ("memory", None)
    except BaseException as exc:  # noqa: BLE001 - everything is reported, nothing escapes
        outcome = ("error", traceback_summary(exc))
    try:
        conn.send(outcome)
    except MemoryError:  # the result itself did not fit in the budget once pickled
        conn.send(("memory", None))


def _serve(control_fd: int) -> None:
    """The zygote: fork one worker per socket received; exit when the caller's side closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    try:
        import cv2

        cv2.setNumThreads(1)  # one file, one core: no thread pool inside the address-space cap
    except ImportError:
        pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    control = socket.socket(fileno=control_fd)
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not message or not fds:
            return  # the caller has gone
        pid = os.fork()
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a worker may wait for its own children
            code = 0
            try:
                _work(Connection(fds[0]))
            except BaseException:  # noqa: BLE001 - a worker never returns into the zygote loop
                code = 1
            os._exit(code)
        os.close(fds[0])
        control.sendall(_PID.pack(pid))


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
