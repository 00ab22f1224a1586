"""The optimisation loop of a fine-tuning run: the base's network trained on the corrections
mixed with replayed COVID-QU-Ex Train images (``training.loop.train_step``), on this process's
share of each batch under torchrun. Used by rank 0 (``training.finetune_run``) and by the
followers (``training.finetune.follow``) alike."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from inference.model import InfMapNet, ModelConfig
from training import distributed
from training.data import SplitArrays, to_tensors
from training.finetune_options import FinetuneOptions
from training.loop import lr_at, train_step
from training.losses import MultiTaskLoss
from training.run_control import Progress


def batches(n: int, per_batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of ``per_batch`` indices of ``range(n)``, every index once per pass."""
    order = np.empty(0, np.int64)
    while True:
        while len(order) < per_batch:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:per_batch]
        order = order[per_batch:]


def round_to_half(model: torch.nn.Module) -> None:
    """Round float weights to float16 and back, as the saved checkpoint stores them, so the
    metrics describe exactly the registered weights."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())


def train(
    model: InfMapNet,
    config: ModelConfig,
    corr_arrays: SplitArrays,
    corr_has_masks: list[bool],
    replay: SplitArrays | None,
    opts: FinetuneOptions,
    progress: Progress,
    d: distributed.Dist,
    loss_fn: MultiTaskLoss | None = None,
) -> tuple[InfMapNet, int, float]:
    """The training loop on the base's network: corrections mixed with replayed Train images.
    A correction without masks (a reading only) trains the class head only.
    Returns (model in eval mode with float16-rounded weights, replayed per batch, seconds).
    Under torchrun each process takes its share of every batch (same seeds, same batches).
    ``loss_fn``: the base's training loss (``MultiTaskLoss.as_trained``); default 1.0's."""
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    distributed.check_same("the training set (corrections, replay images)",
                           (len(corr_arrays), len(replay) if replay is not None else -1), d)
    trained = distributed.wrap(model, d)  # DDP starts every process from rank 0's weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    loss_fn = loss_fn or MultiTaskLoss()
    torch.manual_seed(opts.seed)  # dropout in the class head uses the global generator
    gen = torch.Generator().manual_seed(opts.seed + d.rank)  # augmentation draws per process
    rng = np.random.default_rng(opts.seed)  # the batches: the same in every process
    n_replay = min(opts.batch_size - 1, round(opts.batch_size * opts.replay_ratio)) \
        if replay is not None else 0
    corr_batches = batches(len(corr_arrays), opts.batch_size - n_replay, rng)
    has_masks = torch.from_numpy(np.asarray(corr_has_masks, bool))
    replay_batches = (batches(len(replay), n_replay, rng)
                      if replay is not None and n_replay else None)
    warmup = max(1, opts.steps // 10)
    running: dict[str, float] = {}
    t_train = time.monotonic()
    bar = progress.bar(opts.steps, "fine-tune")
    for step in range(opts.steps):
        idx = distributed.shard(next(corr_batches), d)
        img, masks, labels = to_tensors(corr_arrays, idx)
        known = has_masks[idx]
        if replay is not None and replay_batches is not None:
            r_img, r_masks, r_labels = to_tensors(
                replay, distributed.shard(next(replay_batches), d))
            img, masks = torch.cat([img, r_img]), torch.cat([masks, r_masks])
            labels = torch.cat([labels, r_labels])
            known = torch.cat([known, torch.ones(len(r_labels), dtype=torch.bool)])
        parts = train_step(trained, optimizer, loss_fn, img, masks, labels, gen, config,
                           lr_at(step, opts.steps, opts.lr, warmup), opts.bf16,
                           opts.channels_last, mask_known=known)
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
    distributed.check_in_sync(model, d)
    train_seconds = time.monotonic() - t_train
    model = model.to(memory_format=torch.contiguous_format).eval()
    round_to_half(model)

    return model, n_replay, train_seconds
