"""Many annotators saving at once: throughput, latency, refusals and errors, SQLite vs PostgreSQL.

    python -m benchmarks.load_test [--annotators 1 4 8 16] [--seconds 30] [--studies 20]
        [--backend sqlite postgresql] [--think-ms 20] [--size 512] [--database-url URL]

Each simulated annotator is a thread in one process that does what the correction page does,
through the service layer (``services.studies``): pick one of ``--studies`` studies at random,
read the head of its lung or infection mask, draw for ``--think-ms`` (uniform 0..2x), then
``save_mask`` on that head as a draft or a submission. Two annotators on the same head at the
same time is the conflict the app must refuse: the loser's mask is kept as a conflict draft.
The threads share one engine (one app process), with a pool as large as the number of
annotators. Fewer studies means more conflicts. Each number of annotators is a run of its own on a
new empty database.

Measured per backend: saves per second (every ``save_mask`` call), p50/p95/max latency of a
save, how many were refused (kept as drafts) and how many failed (any other outcome or
exception). Afterwards the database is checked: every accepted save and every kept draft is
there, each mask's history is one unbroken chain (every accepted version's parent is the one
before it), nothing was lost.

PostgreSQL: a throwaway server (``tests/postgres_server.py``, durable settings: fsync on) unless
``--database-url`` names one. SQLite: a WAL file in a temporary folder. Writes
``benchmarks/results/load_test.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, select

from database import images, users
from database.models import AnnotationVersion
from database.session import init_db, session_scope
from services import studies

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "load_test.json"
KINDS = ("lung", "infection")


@dataclass
class Tally:
    """What one annotator saw (merged over all of them at the end)."""

    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    refused: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    refused_draft_ids: list[int] = field(default_factory=list)
    accepted_ids: list[int] = field(default_factory=list)

    def merge(self, other: Tally) -> None:
        self.latencies_ms += other.latencies_ms
        self.ok += other.ok
        self.refused += other.refused
        self.errors += other.errors
        self.error_examples += other.error_examples[: max(0, 5 - len(self.error_examples))]
        self.refused_draft_ids += other.refused_draft_ids
        self.accepted_ids += other.accepted_ids


def _scope_for(engine: Engine) -> Callable[..., AbstractContextManager[Any]]:
    def scope(write: bool = True) -> AbstractContextManager[Any]:
        return session_scope(engine, write=write)

    return scope


def _seed(engine: Engine, n_studies: int, n_annotators: int, size: int) -> tuple[list, list]:
    """Studies (a stand-in payload: saves never read it) and annotators."""
    with session_scope(engine) as s:
        image_ids = []
        for i in range(n_studies):
            sha = f"{i:064x}"
            image, _ = images.add_image(s, b"load-test", sha, f"study-{i}.png", {}, size, size,
                                        "upload")
            image_ids.append(image.id)
        user_ids = [users.get_or_create_user(s, f"annotator-{i}", "annotator").id
                    for i in range(n_annotators)]
    return image_ids, user_ids


def _annotator(
    scope: Callable[..., AbstractContextManager[Any]], user_id: int, image_ids: list[int],
    size: int, think_ms: float, seconds: float, seed: int, start: threading.Barrier,
) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    mask = np.zeros((size, size), bool)
    start.wait()  # all annotators begin together
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        image_id, kind = rng.choice(image_ids), rng.choice(KINDS)
        try:
            head = studies.head_version(scope, image_id, kind)
            if think_ms:
                time.sleep(rng.uniform(0, 2 * think_ms) / 1000)  # drawing
            top, left = rng.randrange(size // 2), rng.randrange(size // 2)
            mask[:] = False
            mask[top : top + size // 3, left : left + size // 3] = True
            status = rng.choice(("draft", "submitted"))
            t0 = time.perf_counter()
            outcome = studies.save_mask(scope, image_id, kind, mask, user_id, status,
                                        head.id if head is not None else None)
            tally.latencies_ms.append((time.perf_counter() - t0) * 1000)
        except Exception as exc:  # counted: a load test reports failures instead of stopping
            tally.errors += 1
            if len(tally.error_examples) < 5:
                tally.error_examples.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        if outcome.ok and outcome.version_id is not None:
            tally.ok += 1
            tally.accepted_ids.append(outcome.version_id)
        elif outcome.version_id is not None:  # refused, kept as a conflict draft
            tally.refused += 1
            tally.refused_draft_ids.append(outcome.version_id)
        else:
            tally.errors += 1
            if len(tally.error_examples) < 5:
                tally.error_examples.append(outcome.message[:300])
    return tally


def _check_history(engine: Engine, tally: Tally) -> dict[str, Any]:
    """Nothing lost, nothing doubled: the database holds exactly what the annotators were told."""
    with session_scope(engine, write=False) as s:
        rows = s.execute(
            select(AnnotationVersion.id, AnnotationVersion.image_id, AnnotationVersion.kind,
                   AnnotationVersion.parent_id, AnnotationVersion.conflict)
            .order_by(AnnotationVersion.id)
        ).all()
    accepted = {r.id for r in rows if not r.conflict}
    drafts = {r.id for r in rows if r.conflict}
    told_accepted, told_drafts = set(tally.accepted_ids), set(tally.refused_draft_ids)
    last: dict[tuple[int, str], int | None] = {}
    broken = 0
    for r in rows:
        if r.conflict:
            continue
        if r.parent_id != last.get((r.image_id, r.kind)):
            broken += 1
        last[(r.image_id, r.kind)] = r.id
    return {
        "accepted_in_db": len(accepted),
        "drafts_in_db": len(drafts),
        "lost": len(told_accepted - accepted) + len(told_drafts - drafts),
        "unreported": len(accepted - told_accepted) + len(drafts - told_drafts),
        "broken_chain_links": broken,
    }


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def run_load(url: str, args: argparse.Namespace, annotators: int) -> dict[str, Any]:
    """One load run of ``annotators`` threads against an empty database at ``url``."""
    engine = init_db(url, pool_size=annotators, max_overflow=0)
    try:
        image_ids, user_ids = _seed(engine, args.studies, annotators, args.size)
        scope = _scope_for(engine)
        start = threading.Barrier(annotators + 1)
        tallies: list[Tally] = [Tally() for _ in user_ids]

        def work(i: int) -> None:
            tallies[i] = _annotator(scope, user_ids[i], image_ids, args.size, args.think_ms,
                                    args.seconds, args.seed * 1000 + i, start)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(annotators)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        total = Tally()
        for t in tallies:
            total.merge(t)
        saves = len(total.latencies_ms)
        return {
            "backend": engine.dialect.name,
            "annotators": annotators,
            "studies": args.studies,
            "seconds": round(elapsed, 2),
            "saves": saves,
            "saves_per_s": round(saves / elapsed, 1) if elapsed else None,
            "accepted": total.ok,
            "refused_kept_as_draft": total.refused,
            "errors": total.errors,
            "error_examples": total.error_examples,
            "p50_ms": _percentile(total.latencies_ms, 50),
            "p95_ms": _percentile(total.latencies_ms, 95),
            "max_ms": round(max(total.latencies_ms), 1) if saves else None,
            "history": _check_history(engine, total),
        }
    finally:
        engine.dispose()


@contextmanager
def _databases(
    backend: str, args: argparse.Namespace, work: Path
) -> Iterator[Callable[[str], str]]:
    """A maker of new empty databases of ``backend`` by name (file stores under ``work``)."""
    if backend == "sqlite":
        yield lambda name: f"sqlite:///{work / name / 'load.sqlite'}"
        return
    os.environ["INFMAP_DATA_DIR"] = str(work / "pg-store")  # a server database has no folder
    if args.database_url:
        yield lambda name: args.database_url
        return
    from tests.postgres_server import start_server

    server = start_server(durable=True)
    try:
        yield server.create_database
    finally:
        server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--annotators", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--studies", type=int, default=20, help="fewer: more conflicts")
    p.add_argument("--think-ms", type=float, default=20.0, help="mean drawing time per save")
    p.add_argument("--size", type=int, default=512, help="mask side in pixels")
    p.add_argument("--backend", nargs="+", choices=("sqlite", "postgresql"),
                   default=["sqlite", "postgresql"])
    p.add_argument("--database-url",
                   help="an empty PostgreSQL database instead of a new server (one --annotators)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="'' to write nothing")
    args = p.parse_args(argv)
    if min(args.annotators) < 1 or args.studies < 1 or args.seconds <= 0:
        p.error("--annotators, --studies and --seconds must be positive")
    if args.database_url and len(args.annotators) > 1:
        p.error("--database-url is one empty database: give one --annotators")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="infmap-load-"))
    saved_store = os.environ.get("INFMAP_DATA_DIR")
    try:
        runs = []
        for backend in args.backend:
            with _databases(backend, args, work) as new_database:
                for n in args.annotators:
                    runs.append(run_load(new_database(f"load_{n}"), args, n))
            if saved_store is None:
                os.environ.pop("INFMAP_DATA_DIR", None)
            else:
                os.environ["INFMAP_DATA_DIR"] = saved_store
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "options": {k: v for k, v in vars(args).items() if k not in ("out", "database_url")},
        "runs": runs,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print("| backend | annotators | saves/s | p50 ms | p95 ms | refused | errors | lost |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['backend']} | {r['annotators']} | {r['saves_per_s']} | {r['p50_ms']} | "
              f"{r['p95_ms']} | {r['refused_kept_as_draft']} | {r['errors']} | "
              f"{r['history']['lost']} |")
    return result


if __name__ == "__main__":
    main()
