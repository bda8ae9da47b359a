import json
import math

import numpy as np
import pytest
import torch

from advcl_dist.config import load_config
from advcl_dist.data import get_dataset
from advcl_dist.engine import CHECKPOINT, Trainer
from advcl_dist.engine.host_sync import HostSyncRecorder
from advcl_dist.engine.metrics import NonFiniteLossError
from advcl_dist.engine.schedule import warmup_cosine


def tiny_cfg(out_dir, *extra):
    return load_config(None, [f"out_dir={out_dir}", "data.name=digits", "data.workers=0", "model.width=4",
                              "model.proj_dim=16", "train.batch_size=128", "train.epochs=2",
                              "optim.warmup_epochs=0.5", "optim.lr=0.1", "attack.steps=1", "train.log_every=1",
                              *extra])


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


class Crash(Exception):
    pass


def crash_at(step):
    def on_step(trainer, record):
        if trainer.step == step:
            raise Crash

    return on_step


@pytest.mark.integration
def test_resume_after_a_crash_continues_with_the_same_losses(tmp_path, capsys):
    """Checkpoint at step 8, crash at step 10 (in epoch 2), resume: steps 9.. match an uninterrupted run."""
    Trainer(tiny_cfg(tmp_path / "straight", "train.ckpt_every=100")).fit(stop_after_steps=14)
    cfg = tiny_cfg(tmp_path / "crashed", "train.ckpt_every=8")
    with pytest.raises(Crash):
        Trainer(cfg).fit(stop_after_steps=14, on_step=crash_at(10))
    assert torch.load(tmp_path / "crashed" / CHECKPOINT, weights_only=False)["step"] == 8
    Trainer(cfg).fit(stop_after_steps=14)

    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "crashed")
    assert "changed config" not in capsys.readouterr().out
    assert sorted(resumed) == list(range(1, 15))  # lines of the lost steps 9, 10 were replaced
    for step in range(1, 15):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), step
    run = json.loads((tmp_path / "crashed" / "run.json").read_text())
    assert [r["step"] for r in run["resumes"]] == [8] and run["world_size"] == 1 and run["end"]


def test_run_folder_has_config_provenance_checkpoint_metrics_and_events(tmp_path):
    out = Trainer(tiny_cfg(tmp_path / "run", "train.ckpt_every=2")).fit(stop_after_steps=3)
    assert load_config(out / "config.yaml").model.width == 4  # the resolved config reloads
    run = json.loads((out / "run.json").read_text())
    assert {"world_size", "nodes", "device", "git_commit", "versions", "start", "end"} <= set(run)
    state = torch.load(out / CHECKPOINT, weights_only=False)
    assert state["step"] == 3 and not state["finished"]
    assert list(losses(out)) == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_con", "train/attack_gain", "train/lr", "train/images_per_s"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert not list(out.glob(".*.tmp"))


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    def poison(trainer, record):
        if trainer.step == 2:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    trainer = Trainer(tiny_cfg(tmp_path / "nan", "train.ckpt_every=2"))
    with pytest.raises(NonFiniteLossError, match="non-finite by step 3.*last good checkpoint"):
        trainer.fit(stop_after_steps=6, on_step=poison)
    state = torch.load(tmp_path / "nan" / CHECKPOINT, weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_update_that_makes_the_weights_non_finite_is_never_checkpointed(tmp_path):
    """Step 4's loss is finite (computed before its update), but the update writes NaN into the weights: step 4's
    checkpoint must not replace step 2's."""
    trainer = Trainer(tiny_cfg(tmp_path / "nan", "train.ckpt_every=2"))
    update = trainer.engine.update

    def poisoned_update(loss):
        update(loss)
        if trainer.step == 3:  # the update of step 4 (the counter moves after it)
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    trainer.engine.update = poisoned_update
    with pytest.raises(NonFiniteLossError, match="weights became non-finite at step 4.*last good checkpoint"):
        trainer.fit(stop_after_steps=6)
    state = torch.load(tmp_path / "nan" / CHECKPOINT, weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_batch_larger_than_the_dataset_is_an_early_error(tmp_path):
    with pytest.raises(ValueError, match="train.batch_size=4096"):
        Trainer(tiny_cfg(tmp_path / "big", "train.batch_size=4096"))


def test_warmup_cosine_schedule():
    kw = dict(total_steps=110, warmup_steps=10, lr=0.5, min_lr=5e-4, warmup_start_lr=0.01)
    assert warmup_cosine(0, **kw) == pytest.approx(0.01)
    assert warmup_cosine(5, **kw) == pytest.approx(0.01 + 0.49 / 2)
    assert warmup_cosine(10, **kw) == pytest.approx(0.5)
    assert warmup_cosine(60, **kw) == pytest.approx(5e-4 + (0.5 - 5e-4) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert warmup_cosine(110, **kw) == pytest.approx(5e-4)


def test_resuming_with_a_changed_config_names_the_changed_keys(tmp_path, capsys):
    Trainer(tiny_cfg(tmp_path / "run")).fit(stop_after_steps=1)
    capsys.readouterr()
    Trainer(tiny_cfg(tmp_path / "run", "train.epochs=3", "loss.temperature=0.2")).fit(stop_after_steps=2)
    assert "changed config: loss.temperature, train.epochs" in capsys.readouterr().out


def test_bf16_autocast_training_runs_on_cpu(tmp_path):
    """The GPU mixed-precision path (bf16 autocast) exercised on CPU: fp32 weights, finite losses."""
    out = Trainer(tiny_cfg(tmp_path / "bf16", "train.amp=bf16")).fit(stop_after_steps=2)
    state = torch.load(out / CHECKPOINT, weights_only=False)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert all(math.isfinite(v) for v in losses(out).values())


def test_channels_last_changes_the_memory_layout_not_the_network(tmp_path):
    """`train.channels_last: true` (NHWC weights on CPU too, as the demo trains: oneDNN's convolutions are
    faster there) computes the same network: the first step's loss is the contiguous (NCHW) run's. SimCLR,
    because PGD's sign() would turn rounding-level differences into whole attack steps. Later steps are
    not compared: the two layouts sum the batch-norm gradients in different orders (relative
    differences up to 1e-2 on near-zero gradients of the first layers, against 1e-5 in NCHW), and training
    amplifies that; hence the default (null) is NHWC on GPU only."""
    nhwc = Trainer(tiny_cfg(tmp_path / "nhwc", "train.method=simclr", "train.channels_last=true"))
    conv = nhwc.model.encoder.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    nhwc.fit(stop_after_steps=1)
    nchw = Trainer(tiny_cfg(tmp_path / "nchw", "train.method=simclr"))  # the default on CPU
    assert nchw.model.encoder.conv1.weight.is_contiguous()
    nchw.fit(stop_after_steps=1)
    a, b = losses(tmp_path / "nhwc"), losses(tmp_path / "nchw")
    assert list(a) == list(b) == [1] and a[1] == pytest.approx(b[1], rel=1e-5)


@pytest.mark.parametrize("method,amp", [("advcl", "fp32"), ("advcl", "bf16"), ("simclr", "fp32"),
                                        ("supervised_at", "fp32")])
def test_a_training_step_never_makes_the_host_wait(tmp_path, method, amp):
    """No `.item()`, `if tensor`, mask indexing, `nonzero` … between two steps: on a GPU each would stall
    the queue of kernels. AdvCL runs with pseudo-labels, so both attacks and every loss term are in it."""
    extra = [f"train.method={method}", f"train.amp={amp}", "attack.steps=2", "train.batch_size=16"]
    if method == "advcl":
        num_samples = len(get_dataset("digits", "train"))
        np.save(tmp_path / "pl.npy", np.stack([np.arange(num_samples) % 2, np.arange(num_samples) % 3], axis=1))
        extra += [f"pseudo.labels={tmp_path / 'pl.npy'}", "pseudo.ks=[2,3]"]
    trainer = Trainer(tiny_cfg(tmp_path / "run", *extra))
    trainer.loader.set_epoch(0)
    batches = iter(trainer.loader)
    trainer.train_step(*next(batches))  # the first step creates the optimizer's momentum buffers
    batch = next(batches)  # reading the data (on the host) is not part of the step
    with HostSyncRecorder() as recorder:
        metrics = trainer.train_step(*batch)
    assert recorder.syncs == []
    assert trainer.step == 2 and all(torch.isfinite(v) for v in metrics.values())
    # the recorder is not blind: the logger's flush reads the metrics on the host
    with HostSyncRecorder() as recorder:
        torch.stack(list(metrics.values())).sum().item()
    assert [s.op for s in recorder.syncs] == ["aten._local_scalar_dense.default"]
