"""Training pipeline on real COVID-QU-Ex files, kept small enough for 2 CPU cores.

The training/resume test runs ``training.train.main`` on a miniature COVID-QU-Ex tree in the
dataset's own folder layout built from the bundled samples (real Test images and masks), so the
real reader, cache, checkpoint and resume code run without the shared data set; so does the
2-process torchrun test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from covid_qu_ex import build_mini_tree, shared_data

from inference.model import CLASS_NAMES, ModelConfig, build_model, load_checkpoint, save_checkpoint
from training import distributed
from training.augment import augment
from training.data import SUBSET, list_samples, load_split
from training.loop import cpu_has_native_bf16, normalise
from training.losses import MultiTaskLoss

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled samples as COVID-QU-Ex: 6 Train, 4 Val and 2 Test images per class."""
    root = tmp_path_factory.mktemp("mini-covid-qu-ex")
    for split, copies in (("Train", 3), ("Val", 2), ("Test", 1)):
        build_mini_tree(root, copies=copies, splits=(split,))
    return root


# ----------------------------------------------------------------------------- data


def test_list_samples_real_layout() -> None:
    data = shared_data()
    train = list_samples(data, "Train")
    assert len(train) == 3728
    counts = {c: sum(s.label == i for s in train) for i, c in enumerate(CLASS_NAMES)}
    assert counts == {"COVID-19": 1864, "Non-COVID": 932, "Normal": 932}
    for s in train[::97]:  # labels come from the class folder; masks share the file name
        assert s.image.parent.parent.name == s.class_name == CLASS_NAMES[s.label]
        assert s.lung_mask.name == s.infection_mask.name == s.image.name
        assert s.lung_mask.parent.parent.name == s.class_name
    assert [s.label for s in train] == sorted(s.label for s in train)  # sorted by class
    assert len(list_samples(data, "Val")) == 932
    assert len(list_samples(data, "Test")) == 1166
    # The inner "Infection Segmentation Data" folder is accepted as root too.
    assert len(list_samples(data / SUBSET, "Val")) == 932
    with pytest.raises(ValueError):
        list_samples(data, "train")


# ----------------------------------------------------------------------------- augment


def _batch(b: int = 8, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    images = torch.rand(b, 1, size, size, generator=g)
    masks = torch.zeros(b, 2, size, size)
    masks[:, 0, 12:52, 4:26] = 1  # a "lung" in the image's left half only
    masks[:, 1, 20:40, 8:20] = 1
    return images, masks


def test_augment_shapes_ranges_binary() -> None:
    images, masks = _batch()
    out_i, out_m = augment(images, masks, torch.Generator().manual_seed(0))
    assert out_i.shape == images.shape and out_m.shape == masks.shape
    assert out_i.dtype == images.dtype and out_m.dtype == masks.dtype
    assert float(out_i.min()) >= 0.0 and float(out_i.max()) <= 1.0
    assert set(torch.unique(out_m).tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_i, images)  # it did something


def test_augment_deterministic_per_seed() -> None:
    images, masks = _batch()
    a = augment(images, masks, torch.Generator().manual_seed(7))
    b = augment(images, masks, torch.Generator().manual_seed(7))
    c = augment(images, masks, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_augment_never_flips_left_right() -> None:
    images, masks = _batch(b=32)
    for seed in range(4):
        _, out = augment(images, masks, torch.Generator().manual_seed(seed))
        half = out.shape[-1] // 2
        for ch in range(2):
            left = out[:, ch, :, :half].sum((1, 2))
            total = out[:, ch].sum((1, 2))
            assert bool((total > 0).all()), "mask shifted out of the image"
            assert float((left / total).min()) > 0.9


def test_augment_keeps_infection_inside_lung() -> None:
    images, masks = _batch()
    _, out = augment(images, masks, torch.Generator().manual_seed(3))
    assert bool((out[:, 1] <= out[:, 0]).all())  # same grid, nearest: containment preserved


# ----------------------------------------------------------------------------- optimisation


def test_loss_decreases_on_fixed_batch(mini_root: Path) -> None:
    """Plain optimisation on 4 real images at 64x64 must fit them (no augmentation)."""
    torch.manual_seed(0)
    data = load_split(mini_root, "Train", size=64)  # exercises the resize path too
    idx = np.array([0, 1, len(data) // 2, len(data) - 1])  # 2 COVID-19, Non-COVID, Normal
    config = ModelConfig()
    images = torch.from_numpy(data.images[idx]).float().div(255).unsqueeze(1)
    masks = torch.from_numpy(np.stack([data.lungs[idx], data.infections[idx]], 1)).float()
    labels = torch.from_numpy(data.labels[idx])
    model = build_model(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = MultiTaskLoss()
    losses = []
    for _ in range(20):
        mask_logits, class_logits = model(normalise(images, config))
        assert mask_logits.shape == (4, 2, 64, 64) and class_logits.shape == (4, 3)
        loss, parts = loss_fn(mask_logits, class_logits, masks, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert math.isfinite(losses[-1]) and set(parts) == {"lung", "infection", "class"}
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


# ----------------------------------------------------------------------------- train.main


def test_train_main_checkpoint_and_resume(
    mini_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.train import main

    out, work = tmp_path / "best.pt", tmp_path / "work"
    common = ["--data", str(mini_root), "--out", str(out), "--work-dir", str(work),
              "--cache-dir", str(tmp_path / "cache"), "--limit", "16", "--batch-size", "4",
              "--version", "0.0.1-test"]
    main([*common, "--max-steps", "3", "--epochs", "1"])
    first = capsys.readouterr().out
    assert "resumed" not in first
    assert out.is_file() and (work / "last.pt").is_file()
    assert list((tmp_path / "cache").glob("Train_256_*.npz"))  # decoded-array cache written

    loaded = load_checkpoint(out)  # torch.load(weights_only=True) inside
    assert loaded.version == "0.0.1-test" and len(loaded.sha256) == 64
    val = loaded.meta["metrics"]["val"]
    assert set(val) == {"lung_dice", "infection_dice_covid", "accuracy", "graded_without_lesion"}
    assert all(0.0 <= v <= 1.0 for v in val.values())
    assert loaded.meta["training"]["epoch"] == 1
    assert loaded.meta["config"]["input_size"] == 256
    assert all(v.dtype == torch.float16 for v in torch.load(out, weights_only=True)[
        "state_dict"].values() if v.is_floating_point())
    history1 = json.loads((work / "history.json").read_text())
    assert [h["epoch"] for h in history1] == [1]
    state = torch.load(work / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 3)

    # Same command, one more epoch: continues from last.pt instead of starting over.
    main([*common, "--max-steps", "6", "--epochs", "2"])
    second = capsys.readouterr().out
    assert "resumed at epoch 2, step 0/4" in second
    history2 = json.loads((work / "history.json").read_text())
    assert [h["epoch"] for h in history2] == [1, 2]
    assert history2[0] == history1[0]
    state = torch.load(work / "last.pt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (2, 6)
    assert load_checkpoint(out).meta["training"]["epoch"] in (1, 2)


def test_false_infection_ramp_rises_per_step_and_is_recorded(
    mini_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.train as train_module

    scales: list[float] = []
    real_step = train_module.train_step

    def recording_step(model, optimizer, loss_fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        scales.append(loss_fn.false_infection_scale)
        return real_step(model, optimizer, loss_fn, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", recording_step)
    out = tmp_path / "best.pt"
    train_module.main(["--data", str(mini_root), "--out", str(out), "--work-dir",
                       str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
                       "--limit", "16", "--batch-size", "4", "--epochs", "1",
                       "--false-infection-weight", "0.5", "--false-infection-ramp-epochs", "1"])
    assert scales == [0.0, 0.25, 0.5, 0.75]  # 4 steps per epoch, ramped over one epoch
    training = load_checkpoint(out).meta["training"]
    assert training["false_infection_weight"] == 0.5
    assert training["false_infection_ramp_epochs"] == 1.0


def test_freeze_encoder_trains_the_masks_only(mini_root: Path, tmp_path: Path) -> None:
    """--freeze encoder: the encoder and class head (weights and batch-norm statistics) stay
    exactly the init's, the decoder moves; without --init the flag is refused."""
    from training.train import main

    init_model = build_model(ModelConfig())
    init = save_checkpoint(init_model, tmp_path / "init.pt", meta={"version": "0.0.0-init"})
    work = tmp_path / "work"
    common = ["--data", str(mini_root), "--out", str(tmp_path / "best.pt"),
              "--cache-dir", str(tmp_path / "cache"), "--limit", "16", "--batch-size", "4",
              "--max-steps", "3", "--epochs", "1", "--lr", "1e-3", "--warmup", "1"]
    with pytest.raises(SystemExit, match="--init"):
        main([*common, "--work-dir", str(tmp_path / "refused"), "--freeze", "encoder"])
    main([*common, "--work-dir", str(work), "--freeze", "encoder", "--init", str(init)])

    before = init_model.state_dict()
    after = torch.load(work / "last.pt", weights_only=True)["model"]
    frozen = [k for k in before if k.startswith(("net.encoder.", "net.classification_head."))]
    moving = [k for k in before if k.startswith("net.decoder.") and before[k].is_floating_point()]
    assert frozen and moving
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in moving)
    assert load_checkpoint(tmp_path / "best.pt").meta["training"]["frozen"] == "encoder"


@pytest.mark.timeout(1200)  # two cold torch starts on a busy 2-core machine
def test_train_under_torchrun_in_two_processes(mini_root: Path, tmp_path: Path) -> None:
    """Two processes (torchrun, DDP over gloo on CPU) each take half of every batch; training
    fails if their weights ever differ (``distributed.check_in_sync``); rank 0 alone writes."""
    out, work = tmp_path / "best.pt", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.train", "--data", str(mini_root), "--out", str(out),
           "--work-dir", str(work), "--cache-dir", str(tmp_path / "cache"), "--limit", "16",
           "--batch-size", "4", "--max-steps", "3", "--epochs", "1", "--threads", "1",
           "--version", "0.0.1-ddp"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in 2 process(es)" in done.stdout
    assert done.stdout.count('"epoch": 1') == 1  # one validation: rank 0's
    loaded = load_checkpoint(out)
    assert loaded.meta["training"]["processes"] == 2
    assert loaded.meta["training"]["batch_size"] == 4  # the global batch, 2 per process
    state = torch.load(work / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "cache", "work"]

    with pytest.raises(SystemExit, match="divide evenly"):
        distributed.check_batch(5, distributed.Dist(rank=0, world_size=2))
    shares = [distributed.shard(np.arange(6), distributed.Dist(r, 2)) for r in (0, 1)]
    assert [s.tolist() for s in shares] == [[0, 2, 4], [1, 3, 5]]


# ----------------------------------------------------------------------------- evaluate


EXPECTED_KEYS = {
    "split", "data", "checkpoint", "settings", "timing", "n_images", "counts", "lungs",
    "infection", "classification", "definitions", "published_anchors", "notes", "figures",
    "gradcam_in_lung", "domain",
}


def test_evaluate_cli_random_checkpoint(tmp_path: Path, capsys) -> None:
    from training.evaluate import main

    data = build_mini_tree(tmp_path / "qu-ex", copies=2, splits=("Test",))  # 12 images
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(), tmp_path / "random.pt", meta={"version": "random"},
                           half=True)
    out = tmp_path / "eval"
    main(["--data", str(data), "--split", "Test", "--checkpoint", str(ckpt), "--out", str(out),
          "--limit", "12", "--batch-size", "6", "--cache-dir", ""])
    assert "lung Dice mean / pooled" in capsys.readouterr().out

    def no_nan(x: str) -> None:
        raise AssertionError(f"non-strict JSON constant {x}")

    m = json.loads((out / "metrics.json").read_text(), parse_constant=no_nan)
    assert set(m) == EXPECTED_KEYS
    assert m["n_images"] == 12 and sum(m["counts"].values()) == 12
    assert all(m["counts"][c] > 0 for c in CLASS_NAMES)  # evenly spaced subset keeps classes
    assert m["checkpoint"]["version"] == "random" and len(m["checkpoint"]["sha256"]) == 64
    assert m["settings"]["bf16"] is False and m["settings"]["threshold"] is None
    for key in ("dice_mean", "iou_mean", "dice_pooled", "iou_pooled"):
        assert 0.0 <= m["lungs"][key] <= 1.0
        assert 0.0 <= m["infection"]["covid"][key] <= 1.0
    rest = m["infection"]["non_covid_normal"]
    assert {"empty_share", "near_empty_share", "near_empty_tolerance"} <= set(rest)
    assert rest["empty_share"] <= rest["near_empty_share"]
    cls = m["classification"]
    assert {"accuracy", "per_class", "confusion_matrix", "covid_sensitivity",
            "covid_specificity", "roc_auc", "ece", "operating_point_spec95"} <= set(cls)
    assert set(cls["roc_auc"]) == {*CLASS_NAMES, "macro"}
    assert np.array(cls["confusion_matrix"]).sum() == 12
    assert {"sensitivity", "specificity", "threshold"} <= set(cls["operating_point_spec95"])
    assert any("not chosen on Test" in n for n in m["notes"])
    assert "dice_mean / iou_mean" in m["definitions"]
    for fig in ("confusion_matrix.png", "roc_curves.png", "reliability.png",
                "infection_dice_hist.png"):
        assert fig in m["figures"]
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "per_image.csv").read_text().splitlines()
    assert len(rows) == 13


def test_evaluate_arrays_in_memory(mini_root: Path) -> None:
    from training.evaluate import evaluate_arrays, predict_arrays

    data = load_split(mini_root, "Test", size=256)  # 2 per class
    torch.manual_seed(0)
    model = build_model().train()
    preds = predict_arrays(model, data, batch_size=4)
    assert model.training  # mode given back
    assert preds.probs.shape == (6, 3)
    np.testing.assert_allclose(preds.probs.sum(1), 1.0, atol=1e-6)
    assert preds.lungs.shape == preds.infections.shape == (6, 256, 256)
    assert not (preds.infections & ~preds.lungs).any()  # infection inside the lungs
    m = evaluate_arrays(model, data, batch_size=3)
    assert m["n_images"] == 6 and m["counts"] == dict.fromkeys(CLASS_NAMES, 2)
    assert m["infection"]["covid"]["n_images"] == 2
    # Same preprocessing and decision as the Val metrics training selects checkpoints by.
    from training.train import validate

    val = validate(model, data, bf16=False)
    assert m["lungs"]["dice_mean"] == pytest.approx(val["lung_dice"], abs=1e-3)
    assert m["infection"]["covid"]["dice_mean"] == pytest.approx(val["infection_dice_covid"],
                                                                abs=1e-3)
    assert m["classification"]["accuracy"] == pytest.approx(val["accuracy"])
    with pytest.raises(ValueError, match="expects 256x256"):
        predict_arrays(model, load_split(mini_root, "Test", size=64))


def test_unlabelled_corrections_train_masks_but_not_the_class() -> None:
    from training.losses import NO_LABEL

    torch.manual_seed(0)
    loss_fn = MultiTaskLoss()
    mask_logits = torch.randn(4, 2, 16, 16)
    class_logits = torch.randn(4, 3, requires_grad=True)
    masks = (torch.rand(4, 2, 16, 16) > 0.5).float()
    labels = torch.tensor([0, 2, NO_LABEL, NO_LABEL])

    _, parts = loss_fn(mask_logits, class_logits, masks, labels)
    plain = torch.nn.functional.cross_entropy(class_logits[:2], labels[:2], label_smoothing=0.05)
    assert parts["class"] == pytest.approx(float(plain.detach()))

    total, parts = loss_fn(mask_logits, class_logits, masks, torch.full((4,), NO_LABEL))
    assert parts["class"] == 0.0
    total.backward()  # the graph still runs, with no class gradient
    assert torch.count_nonzero(class_logits.grad) == 0


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux /proc/cpuinfo")
def test_bf16_is_used_only_where_the_cpu_has_it_natively() -> None:
    """Emulated bf16 made a training step 8.2x slower on an AVX2-only CPU: the default must
    follow the CPU's own flags."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


def test_ema_with_warmup_follows_a_young_model_and_keeps_integer_buffers() -> None:
    """A from-scratch run validated lung Dice 0 for two epochs: the fixed-decay EMA still held
    the random initial weights. With the warm-up the average follows the model early on."""
    from torch.optim.swa_utils import AveragedModel

    from training.loop import ema_decay_at, ema_with_warmup

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    torch.nn.init.zeros_(net[0].weight)
    ema = AveragedModel(net, avg_fn=ema_with_warmup(0.998), use_buffers=True)
    ema.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    net(torch.randn(8, 3))  # BatchNorm counts a batch: an integer buffer
    for _ in range(50):
        ema.update_parameters(net)
    assert float(ema.module[0].weight.detach().mean()) > 0.8  # a fixed 0.998 gives 0.095
    assert ema.module[1].num_batches_tracked.dtype == torch.long
    assert ema_decay_at(0, 0.998) == pytest.approx(0.1)
    assert ema_decay_at(100_000, 0.998) == 0.998
