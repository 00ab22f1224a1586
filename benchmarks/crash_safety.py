"""Crash safety, measured: several writer processes save annotation versions into one SQLite
database at once; one of them is killed with SIGKILL in the middle of its saves, repeatedly.

    python -m benchmarks.crash_safety [--writers 4] [--rounds 10] [--seconds 3] [--out PATH]

Every writer appends versions of the lung mask of one shared study (so they race for the head:
a refused stale save is retried on the new head) and of its own study, and writes the id of
each save to its acknowledgement file only after the transaction committed. After every round
(one writer killed at a random moment, the others stopped) the checker asserts:
``PRAGMA integrity_check`` is ``ok``; every acknowledged version is in the database; every
version's mask decodes (no half-written version) and its parent is an earlier version of the
same study and kind, with at most one child per parent (no fork from a lost race). Writes
``benchmarks/results/crash_safety.json`` with the counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import signal
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

import settings
from database import annotation_versions, images, users
from database.masks import png_to_mask
from database.models import User
from database.session import init_db, session_scope
from database.versioning import StaleVersionError

RESULTS = settings.REPO_ROOT / "benchmarks" / "results"
H, W = 64, 64


def _writer(url: str, name: str, studies: list[int], ack_path: str, seed: int) -> None:
    """Save versions until killed or stopped; ack each one after its commit returned."""
    rng = np.random.default_rng(seed)
    engine = init_db(url)
    with session_scope(engine) as s:
        author_id = users.get_or_create_user(s, name, "annotator").id
    with open(ack_path, "a", buffering=1) as ack:
        while True:
            image_id = int(rng.choice(studies))
            mask = rng.random((H, W)) < 0.3
            try:
                with session_scope(engine) as s:
                    head = annotation_versions.head_version(s, image_id, "lung")
                    author = s.get(User, author_id)
                    version = annotation_versions.save_annotation(
                        s, image_id, "lung", mask, author, "draft",
                        head.id if head is not None else None,
                    )  # fmt: skip
                    new_id = int(version.id)
            except StaleVersionError:
                continue  # another writer won the head: draw on the new one
            ack.write(f"{new_id}\n")
            os.fsync(ack.fileno())


def _check(db_file: Path, acks: list[Path]) -> dict[str, int]:
    con = sqlite3.connect(db_file)
    try:
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
        rows = con.execute(
            "SELECT id, image_id, kind, parent_id, mask_png FROM annotation_versions"
        ).fetchall()
    finally:
        con.close()
    assert integrity == "ok", integrity
    stored = {r[0]: r for r in rows}
    acked = {int(line) for p in acks if p.exists() for line in p.read_text().split()}
    missing = acked - set(stored)
    assert not missing, f"acknowledged but missing: {sorted(missing)[:10]}"
    children: dict[int, int] = {}
    for vid, image_id, kind, parent, png in rows:
        assert png_to_mask(png).shape == (H, W), vid  # decodes: not half written
        if parent is not None:
            p = stored[parent]
            assert p[1] == image_id and p[2] == kind and parent < vid, vid
            children[parent] = children.get(parent, 0) + 1
    forks = [p for p, n in children.items() if n > 1]
    assert not forks, f"versions with two children: {forks[:10]}"
    return {"versions": len(rows), "acknowledged": len(acked)}


def run(writers: int, rounds: int, seconds: float, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    folder = Path(tempfile.mkdtemp(prefix="infmap-crash-"))
    db_file = folder / "infmap.sqlite"
    url = f"sqlite:///{db_file}"
    engine = init_db(url)
    with session_scope(engine) as s:
        ids = []
        for i in range(writers + 1):
            payload = f"payload-{i}".encode() * 8
            sha = hashlib.sha256(f"study-{i}".encode()).hexdigest()
            image, _ = images.add_image(s, payload, sha, f"study {i}", {}, W, H, "upload")
            ids.append(int(image.id))
    engine.dispose()
    shared, own = ids[0], ids[1:]
    ctx = mp.get_context("spawn")
    acks = [folder / f"ack-{w}.txt" for w in range(writers)]
    log: list[dict[str, object]] = []
    for r in range(rounds):
        procs = [ctx.Process(target=_writer, args=(url, f"writer {w}", [shared, own[w]],
                                                   str(acks[w]), seed * 1000 + r * 10 + w))
                 for w in range(writers)]  # fmt: skip
        for p in procs:
            p.start()
        time.sleep(seconds * rng.uniform(0.5, 1.0))
        victim = rng.randrange(writers)
        os.kill(procs[victim].pid, signal.SIGKILL)  # mid-save, whatever it was doing
        time.sleep(seconds * 0.2)
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
        counts = _check(db_file, acks)
        log.append({"round": r + 1, "killed": victim, **counts})
        print(f"round {r + 1}: killed writer {victim}; {counts['versions']} versions, "
              f"{counts['acknowledged']} acknowledged, integrity ok")
    return {"writers": writers, "rounds": rounds, "seconds_per_round": seconds,
            "sigkills": rounds, "final": log[-1] if log else {}, "per_round": log,
            "database": str(db_file)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=settings.cli_path, default=RESULTS / "crash_safety.json")
    args = p.parse_args(argv)
    result = run(args.writers, args.rounds, args.seconds, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
