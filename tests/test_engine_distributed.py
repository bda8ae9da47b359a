"""DDP and DeepSpeed on 2 gloo ranks against one process on the same global batch, and 2-rank resume."""
import json

import numpy as np
import pytest
import torch
from float64 import use_float64
from ranks import run_ranks
from unsafe_files import Payload

from advcl_dist.config import load_config
from advcl_dist.distributed import DistInfo, distributed_session
from advcl_dist.engine import CHECKPOINT, Trainer
from advcl_dist.engine.checkpoint import UnsafeFileError, check_deepspeed_shards

pytestmark = pytest.mark.distributed

STEPS = 4


def tiny(out_dir, *extra):
    return [f"out_dir={out_dir}", "data.name=digits", "data.workers=0", "train.device=cpu", "model.width=4",
            "model.proj_dim=16", "train.batch_size=64", "train.epochs=2", "optim.warmup_epochs=0.5",
            "optim.lr=0.1", "attack.steps=2", "train.log_every=1", *extra]


def pseudo_labels(path):
    labels = np.random.default_rng(0).integers(0, [2, 10], size=(1437, 2)).astype(np.int32)
    np.save(path, labels)
    return [f"pseudo.labels={path}", "pseudo.ks=[2,10]"]


class Crash(Exception):
    pass


def train(overrides, stop=STEPS, crash_at=None):
    """One rank's share of a run (also used with one process); True when it crashed as asked."""
    def on_step(trainer, record):
        if trainer.step == crash_at:
            raise Crash

    try:
        with distributed_session("cpu") as info:
            Trainer(load_config(None, overrides), info).fit(stop_after_steps=stop, on_step=on_step)
    except Crash:
        return True
    return False


def train_float64(overrides, stop=STEPS):
    """`train` with the network and the views in float64.

    In float32, the ~1e-6 rounding differences between convolving 32 and 64 images flip a few
    ReLUs whose input is ~0, and a tiny network amplifies that within steps; float64 leaves only
    rounding differences (measured ~1e-13 after 2 steps), so equality can be tested tightly.
    """
    use_float64()
    return train(overrides, stop)


def weights(run_dir):
    state = torch.load(run_dir / CHECKPOINT, weights_only=False)
    return {k: v for k, v in state["model"].items() if v.is_floating_point()}


def losses(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("method", ["advcl", "simclr"])
def test_two_ddp_ranks_end_with_the_weights_of_one_process_on_the_same_global_batch(tmp_path, method):
    """Same global batch of 64 (2 × 32), SyncBN, no random start (the one per-rank stream), float64.

    Tolerance 1e-9 absolute on every weight and running statistic after 4 steps (the steps move the
    weights by > 1e-3); the logged losses (averaged in float32) to 1e-6 relative.
    """
    extra = [f"train.method={method}", "train.sync_bn=true", "attack.random_start=false"]
    if method == "advcl":
        extra += pseudo_labels(tmp_path / "pseudo.npy")
    assert run_ranks(1, train_float64, tiny(tmp_path / "one", *extra)) == [False]
    run_ranks(2, train_float64, tiny(tmp_path / "two", *extra))

    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one["encoder.conv1.weight"].dtype == torch.float64
    start = weights_at_init(tmp_path, extra)
    assert max_difference(one, start) > 1e-3  # the runs did train
    assert max_difference(one, two) < 1e-9
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    for step in l1:
        assert l2[step]["loss"] == pytest.approx(l1[step]["loss"], rel=1e-6)
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["world_size"] == 2 and len(run["nodes"]) == 2 and run["engine"] == "ddp"


def weights_at_init(tmp_path, extra):
    trainer = Trainer(load_config(None, tiny(tmp_path / "init", *extra)))
    return {k: v.clone().double() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_matches_ddp_in_fp32(tmp_path, monkeypatch, zero_stage):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    extra = pseudo_labels(tmp_path / "pseudo.npy") + ["train.amp=fp32"]
    run_ranks(2, train, tiny(tmp_path / "ddp", *extra))
    run_ranks(2, train, tiny(tmp_path / "ds", *extra, "train.engine=deepspeed", f"train.zero_stage={zero_stage}"))
    assert max_difference(weights(tmp_path / "ddp"), weights(tmp_path / "ds")) < 1e-5
    ddp, ds = losses(tmp_path / "ddp"), losses(tmp_path / "ds")
    for step in ddp:
        assert ds[step]["loss"] == pytest.approx(ddp[step]["loss"], abs=1e-5)
        assert ds[step]["lr"] == pytest.approx(ddp[step]["lr"])
    state = torch.load(tmp_path / "ds" / CHECKPOINT, weights_only=True)
    assert state["step"] == STEPS and state["deepspeed_tag"] == f"step{STEPS}"
    assert [p.name for p in (tmp_path / "ds" / "deepspeed").iterdir() if p.is_dir()] == [f"step{STEPS}"]
    # DeepSpeed unpickles its shards fully: a resume lets it only after their pickles name nothing unsafe
    shards = tmp_path / "ds" / "deepspeed" / f"step{STEPS}"
    check_deepspeed_shards(shards)  # what this DeepSpeed writes (ZeRO-2: a loss scaler, enums, fragments)
    crafted = shards / "zero_pp_rank_9_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(tmp_path / "pwned")}, crafted)
    with pytest.raises(UnsafeFileError, match=r"zero_pp_rank_9\S* was refused: it holds a Python object"):
        check_deepspeed_shards(shards)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_rank_run_interrupted_and_resumed_continues_with_the_same_losses(tmp_path, monkeypatch, engine):
    """Checkpoint at step 4, crash at step 6, resume: steps 5-8 and the final weights equal an
    uninterrupted 2-rank run's, per-rank PGD random starts included (test_engine covers an epoch boundary)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    extra = pseudo_labels(tmp_path / "pseudo.npy") + [f"train.engine={engine}"]
    run_ranks(2, train, tiny(tmp_path / "straight", *extra, "train.ckpt_every=100"), 8)
    crashed = tiny(tmp_path / "crashed", *extra, "train.ckpt_every=4")
    assert run_ranks(2, train, crashed, 8, 6) == [True, True]
    assert torch.load(tmp_path / "crashed" / CHECKPOINT, weights_only=False)["step"] == 4
    run_ranks(2, train, crashed, 8)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "crashed")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6, abs=1e-6), step
    assert max_difference(weights(tmp_path / "straight"), weights(tmp_path / "crashed")) < 1e-6
    run = json.loads((tmp_path / "crashed" / "run.json").read_text())
    assert [r["step"] for r in run["resumes"]] == [4] and run["world_size"] == 2


def test_global_batch_not_divisible_by_the_ranks_is_an_early_error(tmp_path):
    ranks = DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="train.batch_size=64 is not divisible by the 3 ranks"):
        Trainer(load_config(None, tiny(tmp_path / "x")), ranks)
