"""Fine-tune InfMap on the annotators' corrections and register the result as a model version.

    python -m training.finetune --db sqlite:///data/infmap.sqlite --out models/versions/ft.pt \\
        [--base CHECKPOINT] [--data ../shared/data/covid-qu-ex] [--steps 150] \\
        [--replay-ratio 0.5] [--seed 0] [--tolerance 0.01] [--run-id ID]

What it does, in order (progress goes to tqdm and to the ``finetune_runs`` row):

1. Training set: the latest submitted or approved annotation version per (study, mask kind).
   A study with only one corrected kind gets the base model's own mask for the other kind: the
   annotator saw both overlays and submitted, so the untouched one was accepted (and dropping
   half-corrected studies would waste most corrections, which usually fix only the infection).
   Infection drawn outside a model-made lung mask grows that lung mask (infection lies inside
   the lungs). Images are decoded from the stored payloads and letterboxed to the network's
   input size exactly as inference does; masks go through the same letterbox.
2. Held aside: each study is held aside for validation when a seeded hash of its content hash
   falls in the lowest ``--holdout`` share (default 20%; at least one study, at least one left
   for training). The hash keeps the choice stable as corrections accumulate, so a study used
   to judge one version is never trained on by the next.
3. Replay: each batch mixes ``--replay-ratio`` of COVID-QU-Ex Train samples (with their class
   labels) into the corrections so the model does not forget what it knew. Corrections carry
   no class, so they stay out of the class loss (``training.losses.MultiTaskLoss``); the
   replayed samples still train the class head.
4. Fine-tuning from ``--base`` (default: the active model version's checkpoint) with AdamW,
   warm-up + cosine LR, bf16 autocast (on CPUs with native bf16) and channels_last
   (``training.loop.train_step``).
5. Evaluation of base and new on the held-aside corrections (per-image mean lung and infection
   Dice over the human-drawn masks only; an image whose human and predicted masks are both
   empty scores 1, exactly one empty scores 0) and on a fixed seeded subset of COVID-QU-Ex Val
   (``--val-size``, default 200; lung Dice over all, infection Dice over COVID-19 images).
6. The checkpoint is written atomically, then the model version is registered with lineage
   (base version, annotation version ids, data hash), metrics and training time in ONE
   transaction that also finishes the run. It becomes active only if it beats the base on the
   held-aside corrections AND loses no more than ``--tolerance`` Dice on Val (lung and
   infection each); otherwise it is registered inactive and a user may activate it by hand.

Interruption: SIGTERM/SIGINT or any exception marks the run ``interrupted``/``failed``, removes
this run's checkpoint if it was not registered, and registers nothing. Resuming is re-running:
a run takes minutes and is deterministic for the same database contents and seed, so no
half-run optimiser state is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import settings
from database import annotations, images, model_versions, runs
from database.session import init_db, session_scope
from inference.model import (
    CLASS_NAMES,
    LoadedModel,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from inference.preprocess import Letterbox, to_float_pixels
from training.data import SplitArrays, list_samples, load_split, read_gray, to_tensors
from training.evaluate import predict_arrays
from training.loop import NATIVE_BF16, lr_at, train_step
from training.losses import NO_LABEL, MultiTaskLoss
from training.metrics import dice_iou_per_image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "covid-qu-ex"
KINDS = ("lung", "infection")


class Interrupted(BaseException):
    """SIGTERM/SIGINT arrived: stop, mark the run interrupted, register nothing."""


class FinetuneError(RuntimeError):
    """The run cannot start or finish (no corrections, no base model, ...); a human message."""


@dataclass
class FinetuneOptions:
    db: str
    out: str
    base: str | None = None  # checkpoint path; None: the active model version's checkpoint
    data: str | None = None  # COVID-QU-Ex root for replay and Val; None: DEFAULT_DATA if present
    steps: int = 150
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-4
    replay_ratio: float = 0.5
    replay_classes: tuple[str, ...] = CLASS_NAMES  # which Train classes to replay
    replay_limit: int = 0  # 0: all of Train (from the array cache); N: a seeded N-image sample
    val_size: int = 200  # seeded subset of COVID-QU-Ex Val; 0: none
    val_exclude: tuple[str, ...] = ()  # Val file names never used here (a benchmark's test set)
    holdout: float = 0.2
    seed: int = 0
    tolerance: float = 0.01
    statuses: tuple[str, ...] = ("submitted", "approved")
    run_id: int | None = None
    version: str | None = None
    activate: str = "auto"  # "auto" (the rule), "never"
    bf16: bool = NATIVE_BF16  # autocast only where the CPU has native bf16
    channels_last: bool = True
    threads: int = 0
    cache_dir: str | None = ".cache/covid-qu-ex"
    progress: bool = True  # tqdm bars
    fail_after_step: int = 0  # tests: raise after this training step (0: never)


@dataclass
class Correction:
    """One study's training target on the network grid."""

    image_id: int
    image_sha256: str
    image: np.ndarray  # uint8 (S, S), letterboxed
    lung: np.ndarray  # bool (S, S)
    infection: np.ndarray  # bool (S, S)
    human: dict[str, int] = field(default_factory=dict)  # kind -> annotation version id
    mask_sha256: dict[str, str] = field(default_factory=dict)  # kind -> sha of the stored PNG


@dataclass
class FinetuneResult:
    run_id: int
    model_version_id: int
    version: str
    checkpoint: str
    activated: bool
    decision: str
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    train_seconds: float
    total_seconds: float


# ----------------------------------------------------------------------------- data


def letterbox_uint8(pixels: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    image = to_float_pixels(pixels)
    box = Letterbox.fit(image.shape[0], image.shape[1], size)
    square = box.apply(image)
    return np.clip(np.rint(square * 255.0), 0, 255).astype(np.uint8), box


def letterbox_mask(mask: np.ndarray, box: Letterbox) -> np.ndarray:
    """A bool mask on the original grid -> bool mask on the square grid (area > half)."""
    if mask.shape != (box.orig_h, box.orig_w):
        from database.masks import resize_mask

        mask = resize_mask(mask, box.orig_h, box.orig_w)
    return box.apply(mask.astype(np.float32)) > 0.5


def holdout_key(image_sha256: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per study and seed."""
    digest = hashlib.sha256(f"{seed}:{image_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_holdout(
    corrections: Sequence[Correction], fraction: float, seed: int
) -> tuple[list[Correction], list[Correction]]:
    """(train, held aside): studies whose key < fraction are held aside; >= 1 each side."""
    if len(corrections) < 2:
        raise FinetuneError(
            f"need corrections on at least 2 studies (1 to train, 1 to check), got "
            f"{len(corrections)}"
        )
    ordered = sorted(corrections, key=lambda c: holdout_key(c.image_sha256, seed))
    n_hold = sum(holdout_key(c.image_sha256, seed) < fraction for c in ordered)
    n_hold = min(max(1, n_hold), len(ordered) - 1)
    held, train = ordered[:n_hold], ordered[n_hold:]
    return sorted(train, key=lambda c: c.image_id), sorted(held, key=lambda c: c.image_id)


def as_split(corrections: Sequence[Correction]) -> SplitArrays:
    return SplitArrays(
        images=np.stack([c.image for c in corrections]),
        lungs=np.stack([c.lung for c in corrections]).astype(np.uint8),
        infections=np.stack([c.infection for c in corrections]).astype(np.uint8),
        labels=np.full(len(corrections), NO_LABEL, np.int64),
        names=[f"image-{c.image_id}" for c in corrections],
    )


def read_samples(root: str | Path, split: str, size: int, pick: Callable[[list], list]
                 ) -> SplitArrays:
    """Decode only the samples ``pick`` chooses from the split's sorted sample list."""
    samples = pick(list_samples(root, split))
    if not samples:
        raise FinetuneError(f"no {split} samples selected")
    return SplitArrays(
        images=np.stack([read_gray(s.image, size) for s in samples]),
        lungs=np.stack([read_gray(s.lung_mask, size) > 127 for s in samples]).astype(np.uint8),
        infections=np.stack([read_gray(s.infection_mask, size) > 127
                             for s in samples]).astype(np.uint8),
        labels=np.array([s.label for s in samples], np.int64),
        names=[s.image.name for s in samples],
    )


def load_replay(opts: FinetuneOptions, size: int) -> SplitArrays:
    classes = {CLASS_NAMES.index(c) for c in opts.replay_classes}
    rng = np.random.default_rng(opts.seed + 1)
    if opts.replay_limit:
        def pick(samples: list) -> list:
            pool = [s for s in samples if s.label in classes]
            idx = np.sort(rng.permutation(len(pool))[: opts.replay_limit])
            return [pool[i] for i in idx]

        return read_samples(opts.data, "Train", size, pick)
    data = load_split(opts.data, "Train", size, opts.cache_dir)
    return data.subset(np.flatnonzero(np.isin(data.labels, sorted(classes))))


def load_val(opts: FinetuneOptions, size: int) -> SplitArrays:
    """A fixed subset of Val: ``val_size`` images by a seeded permutation (same for every run
    with the same seed), minus ``val_exclude``."""
    exclude = set(opts.val_exclude)

    def pick(samples: list) -> list:
        pool = [s for s in samples if s.image.name not in exclude]
        idx = np.sort(np.random.default_rng(opts.seed + 2).permutation(len(pool))[: opts.val_size])
        return [pool[i] for i in idx]

    return read_samples(opts.data, "Val", size, pick)


# ----------------------------------------------------------------------------- metrics


def correction_metrics(
    model: LoadedModel, held: Sequence[Correction], bf16: bool = False
) -> dict[str, Any]:
    """Per-image mean lung and infection Dice on held-aside corrections, counting only the
    human-drawn kind of each study (the model-filled kind would flatter the base)."""
    arrays = as_split(held)
    pred = predict_arrays(model, arrays, bf16=bf16)
    out: dict[str, Any] = {"n_images": len(held)}
    for kind, p, g in (("lung", pred.lungs, arrays.lungs), ("infection", pred.infections,
                                                             arrays.infections)):
        rows = [i for i, c in enumerate(held) if kind in c.human]
        out[f"n_{kind}"] = len(rows)
        out[f"{kind}_dice"] = (float(dice_iou_per_image(p[rows], g[rows] > 0)[0].mean())
                               if rows else None)
    present = [out[f"{k}_dice"] for k in KINDS if out[f"{k}_dice"] is not None]
    out["score"] = float(np.mean(present)) if present else None
    return out


def val_metrics(model: LoadedModel, val: SplitArrays, bf16: bool = False) -> dict[str, Any]:
    pred = predict_arrays(model, val, bf16=bf16)
    covid = val.labels == CLASS_NAMES.index("COVID-19")
    lung = dice_iou_per_image(pred.lungs, val.lungs > 0)[0]
    inf = dice_iou_per_image(pred.infections[covid], val.infections[covid] > 0)[0]
    return {
        "n_images": len(val),
        "n_covid": int(covid.sum()),
        "lung_dice": float(lung.mean()),
        "infection_dice_covid": float(inf.mean()) if covid.any() else None,
        "accuracy": float((pred.predicted == val.labels).mean()),
    }


def decide(
    base: dict[str, Any], new: dict[str, Any], tolerance: float
) -> tuple[bool, str]:
    """The activation rule. Better on the held-aside corrections (mean of the lung and
    infection Dice that exist) and, on Val, neither lung nor infection Dice lower than the
    base's by more than ``tolerance``."""
    b, n = base["corrections"]["score"], new["corrections"]["score"]
    if b is None or n is None:
        return False, "no held-aside corrections to compare on"
    if not n > b:
        return False, f"not better on held-aside corrections ({n:.4f} <= base {b:.4f})"
    if base.get("val") is None or new.get("val") is None:
        return False, "no COVID-QU-Ex Val to check against forgetting (--data); activate by hand"
    for key in ("lung_dice", "infection_dice_covid"):
        bv, nv = base["val"].get(key), new["val"].get(key)
        if bv is not None and nv is not None and nv < bv - tolerance:
            return False, f"worse on Val {key}: {nv:.4f} < base {bv:.4f} - {tolerance}"
    return True, (f"better on held-aside corrections ({n:.4f} > base {b:.4f}) and within "
                  f"{tolerance} of the base on Val")


def data_hash(train: Sequence[Correction], held: Sequence[Correction],
              replay: dict[str, Any]) -> str:
    """sha256 of what the model was trained and judged on: per study the payload hash, the
    annotation version ids and mask hashes (or 'model' for a model-filled kind), which side of
    the split it is on, and the replay settings."""
    rows = []
    for side, group in (("train", train), ("held", held)):
        for c in group:
            rows.append([side, c.image_sha256,
                         {k: [c.human.get(k), c.mask_sha256.get(k, "model")] for k in KINDS}])
    blob = json.dumps({"corrections": sorted(rows, key=lambda r: (r[0], r[1])),
                       "replay": replay}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- run bookkeeping


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


class Progress:
    """tqdm on the terminal plus throttled writes of (fraction, message) to the run row."""

    def __init__(self, engine: Any, run_id: int, show: bool, min_interval: float = 1.0) -> None:
        self.engine, self.run_id, self.show = engine, run_id, show
        self.min_interval = min_interval
        self._last = 0.0

    def update(self, fraction: float, message: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        try:
            with session_scope(self.engine) as s:
                runs.update_run_progress(s, self.run_id, min(1.0, max(0.0, fraction)), message)
        except ValueError as exc:  # someone marked the run finished (the app's stale-run button)
            raise Interrupted(f"run marked finished elsewhere: {exc}") from exc
        except Exception as exc:  # a busy database must not kill the run; the next one retries
            if force:
                raise
            print(f"progress not recorded: {exc}", file=sys.stderr)

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not self.show, mininterval=2, leave=False,
                    file=sys.stderr)


def _start_run(engine: Any, opts: FinetuneOptions) -> int:
    """Adopt the queued run the app created (``--run-id``) or create one; mark it running."""
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()}
    with session_scope(engine) as s:
        if opts.run_id is not None:
            run = runs.get_run(s, opts.run_id)
            if run is None:
                raise FinetuneError(f"there is no fine-tune run {opts.run_id}")
            if run.status != "queued":
                raise FinetuneError(f"fine-tune run {opts.run_id} is already {run.status}; "
                                    "start a new run to try again")
        else:
            run = runs.create_run(s, args)
        runs.update_run_progress(s, run.id, 0.0, "starting", pid=os.getpid())
        return int(run.id)


def _finish_failed(engine: Any, run_id: int, status: str, message: str) -> None:
    try:
        with session_scope(engine) as s:
            run = runs.get_run(s, run_id)
            if run is not None and run.status not in runs.FINISHED_RUN_STATUSES:
                runs.finish_run(s, run_id, status, message=message[:2000])
    except Exception as exc:  # the database itself may be what failed
        print(f"could not mark run {run_id} {status}: {exc}", file=sys.stderr)


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


def finetune(opts: FinetuneOptions, engine: Any = None) -> FinetuneResult:
    """Run one fine-tuning; see the module docstring. Raises ``FinetuneError`` for a run that
    cannot proceed (the run row says why), ``Interrupted`` on SIGTERM/SIGINT."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    own_engine = engine is None
    engine = engine if engine is not None else init_db(opts.db)
    state: dict[str, Any] = {"registered": False, "checkpoint_written": None}
    run_id = _start_run(engine, opts)
    try:
        with signals_raise():
            return _finetune(opts, engine, run_id, state)
    except BaseException as exc:
        with signals_blocked():
            if not state["registered"]:
                written = state["checkpoint_written"]
                if written is not None:  # the checkpoint and save_checkpoint's temporary file
                    Path(written).unlink(missing_ok=True)
                    Path(written + ".tmp").unlink(missing_ok=True)
                if isinstance(exc, Interrupted | KeyboardInterrupt):
                    _finish_failed(engine, run_id, "interrupted", f"interrupted ({exc or 'SIGINT'})"
                                   "; nothing was registered. Start a new run to try again.")
                else:
                    _finish_failed(engine, run_id, "failed", f"{type(exc).__name__}: {exc}")
        if state["registered"] and isinstance(exc, Interrupted | KeyboardInterrupt):
            return state["result"]  # the signal came after the run had completed
        raise
    finally:
        if own_engine:
            engine.dispose()


def _resolve_base(s: Any, opts: FinetuneOptions) -> tuple[Path, Any]:
    """(checkpoint path, its registered model version or None)."""
    versions = model_versions.list_model_versions(s)
    if opts.base:
        path = Path(opts.base).expanduser().resolve()
        if not path.is_file():
            raise FinetuneError(f"no base checkpoint at {path}")
        sha = file_sha256(path)
        match = [v for v in versions if v.checkpoint_sha256 == sha]
        return path, (match[-1] if match else None)  # the oldest registration of these weights
    active = model_versions.get_active_model_version(s)
    if active is None:
        raise FinetuneError("no active model version to start from; pass --base CHECKPOINT")
    return Path(active.checkpoint_path), active


def _load_corrections(s: Any, opts: FinetuneOptions, size: int) -> list[Correction]:
    from database.masks import png_to_mask
    from inference.storage import xray_from_npz_bytes

    by_image: dict[int, dict[str, Any]] = {}
    for version in annotations.training_annotations(s, opts.statuses):
        by_image.setdefault(version.image_id, {})[version.kind] = version
    corrections = []
    for image_id, versions in sorted(by_image.items()):
        image = next(iter(versions.values())).image
        xray = xray_from_npz_bytes(images.read_image_payload(image))
        square, box = letterbox_uint8(xray.pixels, size)
        c = Correction(image_id=image_id, image_sha256=image.sha256, image=square,
                       lung=np.zeros((size, size), bool), infection=np.zeros((size, size), bool))
        for kind, version in versions.items():
            setattr(c, kind, letterbox_mask(png_to_mask(version.mask_png), box))
            c.human[kind] = int(version.id)
            c.mask_sha256[kind] = hashlib.sha256(version.mask_png).hexdigest()
        corrections.append(c)
    return corrections


def fill_missing_kinds(corrections: Sequence[Correction], base: LoadedModel) -> int:
    """Give each study the base model's own mask for a kind nobody corrected; keep infection
    inside the lungs. Returns how many masks were filled in."""
    todo = [c for c in corrections if len(c.human) < len(KINDS)]
    if todo:
        pred = predict_arrays(base, as_split(todo))
        for c, lung, inf in zip(todo, pred.lungs, pred.infections, strict=True):
            if "lung" not in c.human:
                c.lung = lung | c.infection  # the human infection lies inside the lungs
            if "infection" not in c.human:
                c.infection = inf & c.lung
    return sum(len(KINDS) - len(c.human) for c in corrections)


def _batches(n: int, per_batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of ``per_batch`` indices of ``range(n)``, every index once per pass."""
    order = np.empty(0, np.int64)
    while True:
        while len(order) < per_batch:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:per_batch]
        order = order[per_batch:]


def _round_to_half(model: torch.nn.Module) -> None:
    """Round float weights to float16 and back, as the saved checkpoint stores them, so the
    metrics describe exactly the registered weights."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())


def _finetune(
    opts: FinetuneOptions, engine: Any, run_id: int, state: dict[str, Any]
) -> FinetuneResult:
    t_start = time.monotonic()
    progress = Progress(engine, run_id, opts.progress)
    progress.update(0.01, "loading the base model and the corrections", force=True)
    out = Path(opts.out).expanduser().resolve()
    with session_scope(engine, write=False) as s:
        base_path, base_row = _resolve_base(s, opts)
        if out == base_path or any(Path(v.checkpoint_path).resolve() == out
                                   for v in model_versions.list_model_versions(s)):
            raise FinetuneError(f"{out} is a registered model's checkpoint; choose a new --out")
        base_version_id = int(base_row.id) if base_row is not None else None
        base_version = base_row.version if base_row is not None else None
        base = load_checkpoint(base_path)
        size = base.config.input_size
        corrections = _load_corrections(s, opts, size)
    if not corrections:
        raise FinetuneError("there are no submitted or approved corrections to learn from")
    filled = fill_missing_kinds(corrections, base)
    train_set, held = split_holdout(corrections, opts.holdout, opts.seed)

    data_root = opts.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None)
    use_replay = bool(data_root) and opts.replay_ratio > 0
    opts_data = FinetuneOptions(**{**asdict(opts), "data": data_root})
    progress.update(0.03, "loading COVID-QU-Ex replay and Val images", force=True)
    replay = load_replay(opts_data, size) if use_replay else None
    val = load_val(opts_data, size) if data_root and opts.val_size else None

    progress.update(0.06, "evaluating the base model", force=True)
    base_metrics = {"corrections": correction_metrics(base, held),
                    "val": val_metrics(base, val) if val is not None else None}

    # ---- fine-tuning
    model, config = base.model, base.config
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    loss_fn = MultiTaskLoss()
    torch.manual_seed(opts.seed)  # dropout in the class head uses the global generator
    gen = torch.Generator().manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    n_replay = min(opts.batch_size - 1, round(opts.batch_size * opts.replay_ratio)) \
        if replay is not None else 0
    corr_arrays = as_split(train_set)
    corr_batches = _batches(len(train_set), opts.batch_size - n_replay, rng)
    replay_batches = _batches(len(replay), n_replay, rng) if n_replay else None
    warmup = max(1, opts.steps // 10)
    running: dict[str, float] = {}
    t_train = time.monotonic()
    bar = progress.bar(opts.steps, "fine-tune")
    for step in range(opts.steps):
        img, masks, labels = to_tensors(corr_arrays, next(corr_batches))
        if replay_batches is not None:
            r_img, r_masks, r_labels = to_tensors(replay, next(replay_batches))
            img, masks = torch.cat([img, r_img]), torch.cat([masks, r_masks])
            labels = torch.cat([labels, r_labels])
        parts = train_step(model, optimizer, loss_fn, img, masks, labels, gen, config,
                           lr_at(step, opts.steps, opts.lr, warmup), opts.bf16,
                           opts.channels_last)
        for k, v in parts.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
        progress.update(0.1 + 0.75 * (step + 1) / opts.steps,
                        f"fine-tuning: step {step + 1}/{opts.steps}",
                        force=step + 1 == opts.steps)
        if opts.fail_after_step and step + 1 >= opts.fail_after_step:
            raise RuntimeError(f"injected failure after step {step + 1} (test)")
    bar.close()
    train_seconds = time.monotonic() - t_train
    model = model.to(memory_format=torch.contiguous_format).eval()
    _round_to_half(model)

    progress.update(0.87, "evaluating the fine-tuned model", force=True)
    new = LoadedModel(model=model, config=config, meta={}, path=None, sha256=None)
    new_metrics = {"corrections": correction_metrics(new, held),
                   "val": val_metrics(new, val) if val is not None else None}
    accept, reason = decide(base_metrics, new_metrics, opts.tolerance)
    if opts.activate == "never":
        accept, reason = False, f"not activated (--activate never); rule says: {reason}"

    # ---- lineage, checkpoint, registration
    replay_info = {
        "dataset": "COVID-QU-Ex Infection Segmentation Data, Train" if replay is not None
        else None,
        "ratio": opts.replay_ratio if replay is not None else 0.0,
        "per_batch": n_replay, "classes": list(opts.replay_classes),
        "pool_images": len(replay) if replay is not None else 0, "limit": opts.replay_limit,
    }
    root = (base_version or str(base.meta.get("version", "model"))).split("-ft")[0]
    version = opts.version or f"{root}-ft{run_id}"
    lineage = {
        "source": "finetune",
        "run_id": run_id,
        "base_version": base_version,
        "base_version_id": base_version_id,
        "base_checkpoint": str(base_path),
        "base_checkpoint_sha256": base.sha256,
        "annotation_version_ids": sorted(v for c in train_set for v in c.human.values()),
        "held_aside_annotation_version_ids": sorted(v for c in held for v in c.human.values()),
        "train_image_ids": [c.image_id for c in train_set],
        "held_aside_image_ids": [c.image_id for c in held],
        "model_filled_masks": filled,
        "statuses": list(opts.statuses),
        "data_hash": data_hash(train_set, held, replay_info),
        "replay": replay_info,
        "val": {"dataset": "COVID-QU-Ex Infection Segmentation Data, Val (seeded subset)",
                "images": len(val), "seed": opts.seed} if val is not None else None,
        "training": {"steps": opts.steps, "batch_size": opts.batch_size, "lr": opts.lr,
                     "weight_decay": opts.weight_decay, "seed": opts.seed, "bf16": opts.bf16,
                     "channels_last": opts.channels_last, "holdout": opts.holdout,
                     "threads": torch.get_num_threads()},
    }
    metrics = {
        "corrections": new_metrics["corrections"],
        "val": new_metrics["val"],
        "base": base_metrics,
        "decision": {"activate": accept, "reason": reason, "tolerance": opts.tolerance,
                     "rule": "held-aside score > base and Val lung/infection Dice >= base - "
                             "tolerance"},
        "train_seconds": round(train_seconds, 1),
    }
    progress.update(0.95, "saving the checkpoint", force=True)
    meta = {
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_data": "fine-tuned on InfMap corrections + COVID-QU-Ex replay (CC BY-SA 4.0)",
        "base_version": base_version,
        "lineage": {k: lineage[k] for k in ("run_id", "base_version", "data_hash")},
        "metrics": {"val": metrics["val"], "corrections": metrics["corrections"]},
    }
    state["checkpoint_written"] = str(out)
    save_checkpoint(model, out, meta=meta, half=True)  # atomic (tmp + os.replace)
    sha = file_sha256(out)

    with signals_blocked():
        with session_scope(engine) as s:
            if accept and base_version_id is not None and not opts.base:
                active = model_versions.get_active_model_version(s)
                if active is None or active.id != base_version_id:
                    accept = False
                    reason = ("a user changed the active model during the run; not activated "
                              f"automatically (rule: {reason})")
                    metrics["decision"].update(activate=False, reason=reason)
            row = model_versions.register_model_version(
                s, version, str(out), sha, metrics=metrics, parent=base_version_id,
                lineage=lineage, train_minutes=round(train_seconds / 60, 3), activate=accept)
            activated = bool(row.active)
            runs.finish_run(s, run_id, "succeeded",
                            message=f"{version}: {'activated' if activated else 'not activated'}"
                                    f" - {reason}", model_version_id=row.id)
            row_id = int(row.id)
        state["registered"] = True
        state["result"] = FinetuneResult(
            run_id=run_id, model_version_id=row_id, version=version, checkpoint=str(out),
            activated=activated, decision=reason, metrics=metrics, lineage=lineage,
            train_seconds=train_seconds, total_seconds=time.monotonic() - t_start)
    return state["result"]


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> FinetuneOptions:
    d = FinetuneOptions(db="", out="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--db", default=None, help="database URL (default: DATABASE_URL or "
                   "data/infmap.sqlite)")
    p.add_argument("--out", required=True, help="where to write the new checkpoint")
    p.add_argument("--base", default=None, help="checkpoint to start from (default: the active "
                   "model version's)")
    p.add_argument("--data", default=None, help="COVID-QU-Ex root for replay and Val (default: "
                   f"{DEFAULT_DATA} if present)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--replay-ratio", type=float, default=d.replay_ratio,
                   help="share of each batch replayed from COVID-QU-Ex Train")
    p.add_argument("--replay-classes", default=",".join(d.replay_classes),
                   help="comma-separated classes to replay")
    p.add_argument("--replay-limit", type=int, default=d.replay_limit,
                   help="replay from a seeded sample of N Train images (0: all)")
    p.add_argument("--val-size", type=int, default=d.val_size,
                   help="seeded COVID-QU-Ex Val subset size (0: skip Val)")
    p.add_argument("--holdout", type=float, default=d.holdout,
                   help="share of corrected studies held aside to judge the new model")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help="allowed Val Dice loss (lung and infection) for automatic activation")
    p.add_argument("--run-id", type=int, default=None,
                   help="a queued finetune_runs row to report progress to (the app's)")
    p.add_argument("--version", default=None, help="version name (default <base>-ft<run id>)")
    p.add_argument("--activate", choices=("auto", "never"), default="auto")
    p.add_argument("--statuses", default=",".join(d.statuses))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-bf16", action="store_true",
                   help="no CPU bf16 autocast (it is used only where the CPU has native bf16)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--cache-dir", default=d.cache_dir, help="COVID-QU-Ex decoded-array cache")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--fail-after-step", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    return FinetuneOptions(
        db=a.db or settings.database_url(), out=a.out, base=a.base, data=a.data, steps=a.steps,
        batch_size=a.batch_size, lr=a.lr, replay_ratio=a.replay_ratio,
        replay_classes=tuple(c.strip() for c in a.replay_classes.split(",") if c.strip()),
        replay_limit=a.replay_limit, val_size=a.val_size, holdout=a.holdout, seed=a.seed,
        tolerance=a.tolerance, run_id=a.run_id, version=a.version, activate=a.activate,
        statuses=tuple(x.strip() for x in a.statuses.split(",") if x.strip()),
        threads=a.threads, bf16=NATIVE_BF16 and not a.no_bf16, channels_last=not a.no_channels_last,
        cache_dir=a.cache_dir or None, progress=not a.no_progress,
        fail_after_step=a.fail_after_step,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        result = finetune(opts)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"interrupted ({exc}); nothing registered", file=sys.stderr)
        return 128 + (signal.SIGINT if str(exc) == "SIGINT" else signal.SIGTERM)
    except KeyboardInterrupt:
        print("interrupted; nothing registered", file=sys.stderr)
        return 130
    m = result.metrics
    print(json.dumps({"version": result.version, "model_version_id": result.model_version_id,
                      "activated": result.activated, "decision": result.decision,
                      "corrections": m["corrections"], "val": m["val"],
                      "base": m["base"], "train_seconds": round(result.train_seconds, 1),
                      "total_seconds": round(result.total_seconds, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ----------------------------------------------------------------------------- background runs


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
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
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
