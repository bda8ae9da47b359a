"""Finetuning (SLF, AFF) on 2 gloo ranks against one process on the same global batch, DeepSpeed ZeRO-2
against DDP, and a global batch that does not split over the ranks."""
import pytest
import torch
from float64 import use_float64
from ranks import run_ranks

from advcl_dist.config import ConfigError, load_config
from advcl_dist.engine import Trainer
from advcl_dist.finetune import CLASSIFIER, Finetuning, finetune

pytestmark = pytest.mark.distributed

STEPS = 3
PRETRAIN = ["data.name=digits", "data.workers=0", "train.device=cpu", "model.width=4", "model.proj_dim=16",
            "train.batch_size=64", "train.epochs=1", "optim.warmup_epochs=0", "optim.lr=0.1", "attack.steps=1",
            "train.log_every=1"]


def pretrain(tmp_path_factory, method):
    """3 steps of `method`, in float32 (the package's dtype; finetuning loads the weights into float64)."""
    out = tmp_path_factory.mktemp(method)
    Trainer(load_config(None, [f"out_dir={out}", f"train.method={method}", *PRETRAIN])).fit(stop_after_steps=3)
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def pretrained_advcl(tmp_path_factory):
    """An encoder with `normal` and `pgd` BN branches (finetuned through `pgd`)."""
    return pretrain(tmp_path_factory, "advcl")


@pytest.fixture(scope="module")
def pretrained_simclr(tmp_path_factory):
    """An encoder with one BN branch, every parameter of which AFF trains."""
    return pretrain(tmp_path_factory, "simclr")


def ft(out_dir, pretrained, mode, *extra):
    """A tiny finetuning config: global batch 64, PGD-2 inside AFF's TRADES."""
    return [f"out_dir={out_dir}", "data.name=digits", "data.workers=0", "train.device=cpu", "train.log_every=1",
            f"finetune.checkpoint={pretrained}", f"finetune.mode={mode}", "finetune.batch_size=64",
            "finetune.epochs=1", "attack.supervised_steps=2", *extra]


def key_pgd_starts_by_image():
    """PGD random starts drawn per image from (seed, step, its dataset index), as evaluation draws them,
    instead of from the per-rank stream: the same on 1 and 2 ranks (crops and flips already are).

    Why not `attack.random_start=false` as for pretraining: TRADES's inner objective KL(p(x) || p(x_adv))
    and its gradient are exactly 0 at x_adv = x, so without a random start the first PGD step is the sign
    of rounding noise (|g| down to 1e-61 of the largest) and 1e-13 differences between the runs flip it
    (measured: 1 and 2 ranks agreed to 1e-9 after 2 steps, then differed by 3.8 at step 3).
    """
    step = Finetuning.training_step

    def keyed(self, ctx):
        ctx.random.keyed([int(ctx.step) * 10**6 + i for i in ctx.indices.tolist()])  # until the next reseed
        return step(self, ctx)

    Finetuning.training_step = keyed


def floating(state):
    return {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}


def initial_weights(overrides, init_dir):
    """The classifier's floating weights before its first step (seeded as the run seeds them), built into
    `init_dir` so that the run's own folder stays fresh."""
    cfg = load_config(None, [*overrides, f"out_dir={init_dir}"])
    return floating(Trainer(cfg, None, Finetuning(cfg)).model.state_dict())


def finetune_rank(overrides, float64=True, keyed=False, init_dir=None):
    """One rank's share of a finetuning run (or the whole run on one process); with `init_dir`, also returns
    the classifier's weights before the first step."""
    if float64:
        use_float64()
    if keyed:
        key_pgd_starts_by_image()
    init = initial_weights(overrides, init_dir) if init_dir is not None else None
    finetune(load_config(None, overrides), evaluate_after=False, stop_after_steps=STEPS)
    return init


def weights(out_dir):
    state = torch.load(out_dir / CLASSIFIER, weights_only=False)
    assert state["step"] == STEPS
    return floating(state["model"]), state


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def parameters(state):
    """The trained weights, without BN's running statistics (which move even in a frozen-weight forward)."""
    return {k: v for k, v in state.items() if ".running_" not in k}


@pytest.mark.parametrize("mode, method, sync_bn", [
    ("slf", "advcl", False),
    ("slf", "advcl", True),  # SyncBN conversion keeps the frozen encoder frozen
    ("aff", "simclr", True),
    ("aff", "advcl", True),  # the BN branches other than finetune.bn_branch are frozen (no gradient for DDP)
])
def test_two_ddp_ranks_finetune_to_the_classifier_of_one_process_on_the_same_global_batch(tmp_path, request, mode,
                                                                                          method, sync_bn):
    """Global batch 64 (2 × 32), float64, 3 steps. AFF trains the whole network: SyncBN (per view, over the
    ranks) gives 2 ranks one process's batch statistics, and its PGD starts are keyed by image
    (`key_pgd_starts_by_image`). Every weight and BN statistic of the classifier to 1e-9 absolute (measured
    ≤ 1e-10, BN running variances up to ~600 included); the steps move them by > 1e-3. SLF's encoder stays
    exactly as pretrained, with SyncBN too."""
    pretrained = request.getfixturevalue(f"pretrained_{method}")
    extra, keyed = [f"train.sync_bn={str(sync_bn).lower()}"], mode == "aff"
    run_ranks(2, finetune_rank, ft(tmp_path / "two", pretrained, mode, *extra), True, keyed)
    [init] = run_ranks(1, finetune_rank, ft(tmp_path / "one", pretrained, mode, *extra), True, keyed,
                       tmp_path / "init")

    (one, state_one), (two, state_two) = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one["head.weight"].dtype == torch.float64
    assert (state_one["world_size"], state_two["world_size"]) == (1, 2)
    assert state_one["classifier"] == state_two["classifier"]
    assert max_difference(parameters(one), parameters(init)) > 1e-3  # the runs did train, far beyond 1e-9
    assert max_difference(one, two) < 1e-9
    encoder = [k for k in parameters(one) if k.startswith("encoder.")]
    if mode == "slf":  # frozen
        assert all(torch.equal(one[k], init[k]) for k in one if k.startswith("encoder."))  # BN statistics too
    else:
        assert max((one[k] - init[k]).abs().max().item() for k in encoder) > 1e-3


def test_deepspeed_zero2_aff_matches_ddp_on_two_ranks(tmp_path, pretrained_simclr, monkeypatch):
    """AFF (the whole network, SyncBN) through DeepSpeed ZeRO-2 and through DDP, 2 ranks each, in fp32 as
    test_engine_distributed compares them (DeepSpeed's ZeRO optimizer takes fp16/bf16/fp32 weights only).

    Both engines see the same per-rank batches, views and PGD starts (the per-rank streams agree, so the
    random start stays on), hence the same forwards; only the reduction of the gradients differs (DDP's
    bucketed all-reduce vs ZeRO-2's partitioned reduce), i.e. fp32 summation order, ~1e-7 relative per step.
    With 2 ranks every reduced gradient is one sum of two terms, halved exactly, and SGD is elementwise on
    ZeRO's flat partitions, so the weights came out bitwise equal (measured); the tolerance, 1e-5 relative
    and absolute (test_engine_distributed's 1e-5, relative for BN running variances in the hundreds),
    allows for a reduction order that differs in another version. The steps move the weights by > 1e-3."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    extra = ["train.sync_bn=true", "train.amp=fp32"]
    init = initial_weights(ft(tmp_path / "ddp", pretrained_simclr, "aff", *extra), tmp_path / "init")
    run_ranks(2, finetune_rank, ft(tmp_path / "ddp", pretrained_simclr, "aff", *extra), False)
    run_ranks(2, finetune_rank, ft(tmp_path / "ds", pretrained_simclr, "aff", *extra, "train.engine=deepspeed",
                                   "train.zero_stage=2"), False)
    (ddp, _), (ds, state) = weights(tmp_path / "ddp"), weights(tmp_path / "ds")
    assert ddp["head.weight"].dtype == torch.float32
    assert state["engine"] == "deepspeed" and state["deepspeed_tag"] == f"step{STEPS}" and state["world_size"] == 2
    assert max_difference(parameters(ddp), parameters(init)) > 1e-3
    assert ddp.keys() == ds.keys()
    for key in ddp:
        torch.testing.assert_close(ds[key], ddp[key], rtol=1e-5, atol=1e-5, msg=key)


def indivisible_rank(overrides):
    try:
        finetune(load_config(None, overrides), evaluate_after=False)
    except ConfigError as e:
        return str(e)
    return None


def test_finetune_batch_that_does_not_split_over_the_ranks_fails_before_writing(tmp_path, pretrained_simclr):
    out = tmp_path / "run"
    messages = run_ranks(2, indivisible_rank, ft(out, pretrained_simclr, "slf", "finetune.batch_size=255"))
    for message in messages:
        assert message is not None and "finetune.batch_size=255 is not divisible by the 2 ranks" in message
    assert not out.exists()  # nothing written: no config.yaml, run.json or checkpoint
