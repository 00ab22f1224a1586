"""Does CPU bf16 autocast and channels_last make a training step faster here? Measured, not assumed.

    python -m benchmarks.train_step [--batch-size 16] [--steps 8] [--threads T] [--out JSON]

Times ``training.loop.train_step`` (augment, forward, multi-task loss, backward, AdamW) of the
shipped architecture on random 256x256 batches in four settings: float32, float32 +
channels_last, bf16 autocast, bf16 autocast + channels_last. Settings are interleaved round by
round in one process so machine load affects them alike; medians after two warm-up steps each.
Ratios are against float32 in the same run. Writes ``benchmarks/results/train_step.json``
(or ``--out``), with the CPU's capability: bf16 pays only where the CPU has it natively.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import settings  # noqa: E402,F401 - sets HF_HUB_OFFLINE before timm loads
from inference.model import ModelConfig, build_model  # noqa: E402
from training.loop import cpu_has_native_bf16, train_step  # noqa: E402
from training.losses import MultiTaskLoss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"
SETTINGS = {
    "float32": (False, False),
    "float32 + channels_last": (False, True),
    "bf16": (True, False),
    "bf16 + channels_last": (True, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per setting")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=settings.cli_path_str, default=str(RESULTS), help="result JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = ModelConfig()
    size = config.input_size
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(args.batch_size, 1, size, size, generator=gen)
    masks = (torch.rand(args.batch_size, 2, size, size, generator=gen) > 0.5).float()
    labels = torch.randint(0, len(config.class_names), (args.batch_size,), generator=gen)
    loss_fn = MultiTaskLoss()

    runs = {}
    for name, (_, channels_last) in SETTINGS.items():
        torch.manual_seed(0)
        model = build_model(config).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))

    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for round_ in range(args.steps + 2):
        for name, (bf16, channels_last) in SETTINGS.items():
            model, opt = runs[name]
            t0 = time.perf_counter()
            train_step(model, opt, loss_fn, img, masks, labels, gen, config, lr=1e-3,
                       bf16=bf16, channels_last=channels_last)
            if round_ >= 2:  # the first two steps warm up allocators and kernels
                times[name].append(time.perf_counter() - t0)

    ref = statistics.median(times["float32"])
    rows = {name: {"median_s": statistics.median(t), "ratio_vs_float32": statistics.median(t) / ref,
                   "images_per_s": args.batch_size / statistics.median(t)}
            for name, t in times.items()}
    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "native_bf16": cpu_has_native_bf16()},
        "batch_size": args.batch_size, "input_size": size, "timed_steps": args.steps,
        "settings": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| setting (batch {args.batch_size}, {size} px) | s / step | images / s | vs float32 |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_s']:.2f} | {r['images_per_s']:.1f} | "
              f"{r['ratio_vs_float32']:.2f} |")


if __name__ == "__main__":
    main()
