"""Training in several processes (``torchrun``) with DistributedDataParallel over gloo on CPU.

Alone (no ``WORLD_SIZE`` > 1 in the environment) everything here is a no-op, so the training
code has one path. Under torchrun each process takes its share of every global batch
(``shard``), DDP averages the gradients so every replica takes the same step, and only the main
process (rank 0) validates, writes checkpoints and talks to the database; the others wait at a
``barrier``. Differences from one process are batch-order effects: BatchNorm normalises each
process's share on its own, and augmentation draws differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this machine

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_world_size=local)


def finish(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def default_threads(d: Dist) -> int:
    """This process's share of the machine's cores."""
    return max(1, (os.cpu_count() or 1) // d.local_world_size)


def check_batch(batch_size: int, d: Dist) -> None:
    if batch_size % d.world_size:
        raise SystemExit(
            f"--batch-size {batch_size} is the global batch: it must divide evenly among "
            f"{d.world_size} processes"
        )


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """The module to train: DDP around ``model`` (which keeps the weights) under torchrun."""
    return DistributedDataParallel(model) if d.enabled else model


def shard(indices: np.ndarray, d: Dist) -> np.ndarray:
    """This process's share of a global batch (all of it when alone)."""
    return indices[d.rank :: d.world_size]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def check_in_sync(model: torch.nn.Module, d: Dist) -> None:
    """Raise if the replicas' weights differ from rank 0's (DDP keeps them identical)."""
    if not d.enabled:
        return
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = torch.tensor([float((flat - reference).abs().max())])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if float(diff) > 0:
        raise RuntimeError(f"the training processes' weights differ (max |diff| {float(diff)})")


def check_same(what: str, values: tuple[int, ...], d: Dist) -> None:
    """Raise unless every process holds the same ``values`` (e.g. where a resumed run starts)."""
    if not d.enabled:
        return
    low = torch.tensor(values, dtype=torch.int64)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"the training processes disagree on {what}: {values} here")


def broadcast_object(obj: object, d: Dist) -> object:
    """Rank 0's ``obj`` in every process (pickled; for a plan, not for big arrays each step)."""
    if not d.enabled:
        return obj
    box = [obj if d.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
