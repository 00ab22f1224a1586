"""Crash safety, measured (issue 15.6): writers save annotation versions on one SQLite file at
once, and one of them is killed with SIGKILL while it saves, round after round.

    .venv/bin/python -m benchmarks.crash_safety --rounds 30 --writers 4 \
        --out benchmarks/results/crash_safety.json

Each writer is a process of its own (this module with ``--writer``). It saves masks (random
boxes) through ``services.mask_versions.save_mask``, the app's own path (image lock, stale-base
check, the audit record in the same transaction), drawn on the head it last saw, and prints
``ACK <version id> <sha256 of the mask>`` once a save has returned: an acknowledged save. A
refused (stale) save is kept as a conflict draft by the same function and acknowledged alike.
Writers of one round share two images, so saves collide. After a random delay, the parent kills
one writer with SIGKILL at a moment it is inside a save (it says ``SAVING`` just before), lets
the others finish, and checks the database file:

- ``PRAGMA integrity_check`` is ``ok``;
- every acknowledged version is present, with exactly the acknowledged mask;
- no half version: every version row decodes to a whole mask of its image's size, its parent
  exists, and it has exactly one audit record (the save and its record commit together).

``tests/test_crash_safety.py`` runs two short rounds; the counts of the long run are in the
README.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
H, W = 64, 64
IMAGES = 2


# ----------------------------------------------------------------------------- the writer
def random_mask(rng: random.Random) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    top, left = rng.randrange(0, H - 8), rng.randrange(0, W - 8)
    mask[top : top + rng.randrange(4, H - top), left : left + rng.randrange(4, W - left)] = True
    return mask


def mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.asarray(mask, bool)).tobytes()).hexdigest()


def writer(database_url: str, user_id: int, image_ids: list[int], saves: int, seed: int) -> None:
    """Save ``saves`` versions, acknowledging each on stdout once it has returned."""
    from database import annotation_versions
    from services.mask_versions import save_mask
    from services.storage import open_store

    scope = open_store(database_url).scope
    rng = random.Random(seed)
    for _ in range(saves):
        image_id = rng.choice(image_ids)
        with scope(write=False) as s:
            head = annotation_versions.head_version(s, image_id, "infection")
            base = head.id if head is not None else None
        mask = random_mask(rng)
        print("SAVING", flush=True)
        outcome = save_mask(scope, image_id, "infection", mask, user_id, "draft", base)
        if outcome.version_id is None:
            raise SystemExit(f"save refused without a version: {outcome.message}")
        print(f"ACK {outcome.version_id} {mask_digest(mask)}", flush=True)


# ----------------------------------------------------------------------------- one round
@dataclass
class Round:
    acknowledged: int = 0
    versions: int = 0
    conflicts: int = 0
    killed_while_saving: bool = False
    integrity: str = ""
    missing: list[int] = field(default_factory=list)  # acknowledged, not in the database
    wrong_mask: list[int] = field(default_factory=list)  # present, not the acknowledged mask
    half: list[int] = field(default_factory=list)  # undecodable, orphaned or unaudited

    @property
    def ok(self) -> bool:
        return self.integrity == "ok" and not (self.missing or self.wrong_mask or self.half)


def set_up(database_url: str, writers: int) -> tuple[list[int], list[int]]:
    """A fresh database with ``IMAGES`` images and one annotator per writer."""
    from database import images, users
    from services.storage import open_store

    store = open_store(database_url)
    with store.scope() as s:
        image_ids = []
        for n in range(IMAGES):
            payload = f"crash-safety-{n}".encode() * 8
            sha = hashlib.sha256(payload).hexdigest()
            image, _ = images.add_image(s, payload, sha, f"case {n}", {"format": "PNG"}, W, H,
                                        "upload")
            image_ids.append(int(image.id))
        user_ids = [
            int(users.create_user(s, f"Writer {n}", "annotator", "crash-safety-pw", by=None).id)
            for n in range(writers)
        ]
    store.engine.dispose()
    return image_ids, user_ids


def spawn(database_url: str, user_id: int, image_ids: list[int], saves: int,
          seed: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "benchmarks.crash_safety", "--writer", database_url,
           str(user_id), ",".join(map(str, image_ids)), str(saves), str(seed)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def acks(lines: list[str]) -> dict[int, str]:
    """version id -> mask digest, from a writer's ``ACK`` lines (a last line cut short by the
    kill is not an acknowledgement)."""
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ACK" and len(parts[2]) == 64:
            out[int(parts[1])] = parts[2]
    return out


def check(database_url: str, acknowledged: dict[int, str], result: Round) -> None:
    from database import annotation_versions, audit, images, worklist
    from database.session import integrity_check, make_engine, session_scope

    engine = make_engine(database_url)
    try:
        result.integrity = integrity_check(engine)
        with session_scope(engine, write=False) as s:
            image_ids = [r.image_id for r in worklist.worklist(s)]
            sizes = {}
            for image_id in image_ids:
                image = images.get_image(s, image_id)
                assert image is not None
                sizes[image_id] = (image.height, image.width)
            rows = [v for i in image_ids for v in annotation_versions.list_versions(s, i)]
            ids = {v.id for v in rows}
            audited: dict[int, int] = {}  # version id -> its audit records
            for event in audit.list_events(s, audit.EventFilter(limit=None)):
                found = re.match(r"infection mask version (\d+)", event.detail or "")
                if found:
                    audited[int(found.group(1))] = audited.get(int(found.group(1)), 0) + 1
            result.versions = len(rows)
            result.conflicts = sum(bool(v.conflict) for v in rows)
            digests = {}
            for v in rows:
                try:
                    mask = annotation_versions.version_mask(v)
                except Exception:  # noqa: BLE001 - any undecodable blob is a half version
                    result.half.append(v.id)
                    continue
                whole = mask.shape == sizes.get(v.image_id)
                parent_ok = v.parent_id is None or v.parent_id in ids
                audit_ok = audited.get(v.id) == 1
                if not (whole and parent_ok and audit_ok):
                    result.half.append(v.id)
                digests[v.id] = mask_digest(mask)
        for version_id, digest in acknowledged.items():
            if version_id not in ids:
                result.missing.append(version_id)
            elif digests.get(version_id) != digest:
                result.wrong_mask.append(version_id)
    finally:
        engine.dispose()


def run_round(folder: Path, writers: int, saves: int, rng: random.Random) -> Round:
    db = folder / f"round-{rng.randrange(10**9)}.sqlite"
    url = f"sqlite:///{db}"
    image_ids, user_ids = set_up(url, writers)
    procs = [spawn(url, u, image_ids, saves, rng.randrange(10**9)) for u in user_ids]
    victim = rng.randrange(writers)
    lines: list[list[str]] = [[] for _ in procs]
    result = Round()
    # Read the victim's lines until it has acknowledged a random number of saves and says it
    # is inside the next one, then kill it there (the others run on meanwhile).
    target = rng.randrange(1, max(2, saves - 1))
    out = procs[victim].stdout
    assert out is not None
    done = 0
    for line in out:
        lines[victim].append(line)
        done += line.startswith("ACK")
        if line.startswith("SAVING") and done >= target:
            time.sleep(rng.uniform(0.0, 0.02))  # somewhere in the save's transaction
            procs[victim].send_signal(signal.SIGKILL)
            result.killed_while_saving = True
            break
    lines[victim].extend(out.read().splitlines())
    procs[victim].wait()
    for n, proc in enumerate(procs):
        if n == victim:
            continue
        stdout, _ = proc.communicate(timeout=600)
        lines[n] = stdout.splitlines()
        if proc.returncode != 0:
            raise RuntimeError(f"writer {n} failed with exit status {proc.returncode}")
    acknowledged: dict[int, str] = {}
    for writer_lines in lines:
        acknowledged.update(acks(writer_lines))
    result.acknowledged = len(acknowledged)
    check(url, acknowledged, result)
    return result


def run(rounds: int, writers: int, saves: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="crash-safety-") as tmp:
        for _ in range(rounds):
            results.append(run_round(Path(tmp), writers, saves, rng))
    return {
        "rounds": rounds,
        "writers": writers,
        "saves_per_writer": saves,
        "seed": seed,
        "kills_while_saving": sum(r.killed_while_saving for r in results),
        "acknowledged": sum(r.acknowledged for r in results),
        "versions": sum(r.versions for r in results),
        # committed but killed before its ACK line: allowed (the writer never heard back)
        "committed_unacknowledged": sum(r.versions - r.acknowledged for r in results),
        "conflict_drafts": sum(r.conflicts for r in results),
        "integrity_ok": sum(r.integrity == "ok" for r in results),
        "missing": sum(len(r.missing) for r in results),
        "wrong_mask": sum(len(r.wrong_mask) for r in results),
        "half_versions": sum(len(r.half) for r in results),
        "rounds_ok": sum(r.ok for r in results),
        "per_round": [asdict(r) for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--writer":
        url, user, image_ids, saves, seed = argv[1:6]
        writer(url, int(user), [int(i) for i in image_ids.split(",")], int(saves), int(seed))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--saves", type=int, default=25, help="saves per writer and round")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    summary = run(args.rounds, args.writers, args.saves, args.seed)
    brief = {k: v for k, v in summary.items() if k != "per_round"}
    print(json.dumps(brief, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["rounds_ok"] == summary["rounds"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
