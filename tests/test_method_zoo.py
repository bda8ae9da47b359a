"""Every method of the zoo through the shared trainer, as a user runs it.

- tools/pretrain.py on digits, killed mid-step and rerun: the rerun resumes from the last checkpoint and ends
  with exactly the weights and per-step losses of an uninterrupted run;
- 2 gloo ranks against 1 process on the same global batch (float64, SyncBN, no random start: the one
  per-rank random stream): the same weights, since every method's loss runs over the global batch;
- one pipeline with every method and variant as a baseline: each is pretrained with what it declares (a
  teacher, pseudo-labels from its own features + post-processing), finetuned and evaluated to results.json.
The losses themselves are checked against the papers' equations in tests/test_method_<name>.py.
"""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import run_ranks
from test_engine_distributed import losses, max_difference, tiny, train, train_float64, weights
from test_kill_matrix import env  # one process, one thread, no launcher or SLURM variables
from warm_tools import WarmTools

from advcl_dist.config import ConfigError, load_config
from advcl_dist.engine import CHECKPOINT
from advcl_dist.faults import ENV
from advcl_dist.methods import METHODS, build_method, method_values

# Methods, and variants that change what a step computes (acl: ACL-DS; dynacl_air: DynACL with AIR's terms;
# advcl_t1adv_t2adv: an AdvCL view set without a clean view, so without the `normal` BN branch).
ZOO = ["acl", "acl_a2a", "acl_a2s", "acl_air", "rocl", "apdpe", "apdpe_rotation", "dynacl", "dynacl_air", "deacl",
       "lpaff", "supervised_at", "advcl_t1adv_t2adv", "advcl_xadv_t1_t2_xl"]
# Killed and resumed through tools/pretrain.py: every method (variants share its loop, checkpoint and state).
RESUMED = ["acl", "acl_air", "rocl", "apdpe", "dynacl", "deacl", "lpaff"]
# 2 ranks against 1: every method and every variant with its own code path (dynacl_air covers dynacl's, and the
# BN branches of a view set without clean views). apdpe's ensemble penalty differentiates input gradients (a
# double backward), which torch's SyncBatchNorm and the cross-rank gather do not support: it trains with
# per-rank BN statistics, so its result depends on the ranks (its own test below).
RANK_INVARIANT = ["acl", "acl_a2a", "acl_a2s", "rocl", "apdpe_rotation", "dynacl_air", "deacl", "lpaff",
                  "supervised_at", "advcl_t1adv_t2adv"]
# lpaff: one probing epoch and one TRADES epoch of 2 steps each (its own batch size and epochs)
OWN_BUDGET = {"lpaff": ["lpaff.batch_size=512", "lpaff.head_epochs=1", "lpaff.epochs=1"]}
TIMEOUT = 300
SMALL_VIEWS = "views.size=16"  # the 8×8 digits lose nothing, and every step costs a quarter


@pytest.fixture(scope="module")
def needed(tmp_path_factory) -> dict[str, list[str]]:
    """What methods need, made once: pseudo-labels (K = 10), a SimCLR teacher and a DynACL init checkpoint."""
    root = tmp_path_factory.mktemp("needed")
    labels = root / "pseudo_labels.npy"
    np.save(labels, np.random.default_rng(0).integers(0, 10, size=(1437, 1)).astype(np.int64))
    for name, method in (("teacher", "simclr"), ("init", "dynacl")):
        assert train(tiny(root / name, f"train.method={method}"), 1) is False
    return {"pseudo_labels": [f"pseudo.labels={labels}", "pseudo.ks=[10]"],
            "teacher": [f"{{m}}.teacher={root / 'teacher' / CHECKPOINT}"],
            "init": [f"{{m}}.init={root / 'init' / CHECKPOINT}"]}


def overrides_for(name: str, needed: dict[str, list[str]]) -> list[str]:
    """`name`'s method and options as key=value, and the files it needs."""
    values = method_values(name)
    method = values["train.method"]
    args = [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}" for k, v in values.items()]
    for need in sorted(METHODS[method].needs - {"labels"}):
        args += [a.format(m=method) for a in needed[need]]
    return args + OWN_BUDGET.get(name, [])


def test_the_zoo_is_registered_and_every_method_is_run_below():
    for name in ZOO:
        assert method_values(name)["train.method"] in METHODS
    covered = {method_values(n)["train.method"] for n in [*RESUMED, *RANK_INVARIANT, *PIPELINE_ZOO]}
    assert covered >= set(METHODS) - {"advcl", "simclr"}  # those two: test_engine*.py, test_pipeline.py


# -- tools/pretrain.py, killed and resumed --------------------------------------------------------------------
@pytest.fixture(scope="module")
def warm():
    server = WarmTools(env())
    yield server
    server.close()


def pretrain(warm: WarmTools, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    code, out, err = warm.run("pretrain", args, env(**({ENV: fault} if fault else {})), TIMEOUT)
    return subprocess.CompletedProcess(["tools/pretrain.py", *args], code, out, err)


def float_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    return {k: v for k, v in state["model"].items() if v.is_floating_point()}


@pytest.mark.integration
@pytest.mark.parametrize("name", RESUMED)
def test_pretrain_tool_killed_mid_run_resumes_to_the_uninterrupted_weights(name, needed, warm, tmp_path):
    """5 steps (batch 256 of 1437 digits, 1 epoch; lpaff: 4), checkpoints every 2; SIGKILL in step 4."""
    args = [*tiny(tmp_path, "train.batch_size=256", "train.epochs=1", *overrides_for(name, needed)),
            "train.ckpt_every=2", SMALL_VIEWS]
    straight = pretrain(warm, [*args, f"out_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = pretrain(warm, [*args, f"out_dir={tmp_path / 'killed'}"], fault="train.mid_step@4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    again = pretrain(warm, [*args, f"out_dir={tmp_path / 'killed'}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resum" in again.stdout.lower()
    one, two = float_weights(tmp_path / "straight"), float_weights(tmp_path / "killed")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    l1, l2 = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(l1) == sorted(l2) == list(range(1, 5 if name == "lpaff" else 6))
    assert all(l1[s]["loss"] == l2[s]["loss"] for s in l1)
    run = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert run["finished"] is True and run["method"] == method_values(name)["train.method"]


# -- 2 gloo ranks against 1 process ---------------------------------------------------------------------------
def train_float64_keyed(overrides):
    """train_float64 with lpaff's PGD starts drawn per image (see test_finetune_distributed.key_pgd_starts_by_image:
    TRADES's objective has a zero gradient at x_adv = x, so it cannot run without a random start)."""
    from test_finetune_distributed import key_pgd_starts_by_image

    from advcl_dist.finetune import Finetuning
    from advcl_dist.methods.lpaff import LPAFF

    plain = Finetuning.training_step
    Finetuning.training_step = LPAFF.training_step
    key_pgd_starts_by_image()
    LPAFF.training_step, Finetuning.training_step = Finetuning.training_step, plain
    return train_float64(overrides)


@pytest.mark.distributed
@pytest.mark.parametrize("name", RANK_INVARIANT)
def test_two_ranks_end_with_the_weights_of_one_process(name, needed, tmp_path):
    keyed = name == "lpaff"
    extra = [*overrides_for(name, needed), "train.sync_bn=true", f"attack.random_start={str(keyed).lower()}",
             SMALL_VIEWS]
    run = train_float64_keyed if keyed else train_float64
    assert run_ranks(1, run, tiny(tmp_path / "one", *extra)) == [False]
    run_ranks(2, run, tiny(tmp_path / "two", *extra))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = initial_weights(tmp_path / "init", extra)
    assert max_difference(one, start) > 1e-4  # the runs did train
    assert max_difference(one, two) < 1e-9
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) and l1
    for step in l1:
        assert l2[step]["loss"] == pytest.approx(l1[step]["loss"], rel=1e-6)


@pytest.mark.distributed
def test_apdpe_ensemble_trains_on_two_ranks_with_per_rank_bn_and_refuses_sync_bn(needed, tmp_path):
    extra = [*overrides_for("apdpe", needed), SMALL_VIEWS]
    run_ranks(2, train, tiny(tmp_path / "two", *extra))
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "two").values())
    assert sorted(losses(tmp_path / "two")) == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="'train.sync_bn': AP-DPE's diversity penalty needs a double backward"):
        build_method(load_config(None, tiny(tmp_path / "sync", *extra, "train.sync_bn=true")))


def initial_weights(folder: Path, extra: list[str]) -> dict[str, torch.Tensor]:
    from advcl_dist.engine import Trainer

    trainer = Trainer(load_config(None, tiny(folder, *extra)))
    return {k: v.clone().double() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}


# -- the pipeline ---------------------------------------------------------------------------------------------
PIPELINE_ZOO = ["acl", "rocl", "apdpe", "dynacl_air++", "deacl", "supervised_at"]


@pytest.mark.integration
def test_every_method_runs_through_the_pipeline_to_results(warm, tmp_path):
    args = ["data.name=digits", "data.workers=0", "train.device=cpu", "model.width=4", "model.proj_dim=16",
            "train.batch_size=256", "train.epochs=1", "optim.warmup_epochs=0", "attack.steps=1", "pseudo.iters=5",
            "finetune.epochs=1", "finetune.batch_size=256", "attack.supervised_steps=1", "attack.eval_steps=1",
            "eval.autoattack=false", "eval.batch_size=360", "pipeline.finetune=[slf]", "pipeline.figures=false",
            "pipeline.tsne_n=0", SMALL_VIEWS, "train.method=simclr", f"pipeline.baselines=[{','.join(PIPELINE_ZOO)}]",
            "lpaff.batch_size=256", "lpaff.head_epochs=1", "lpaff.epochs=1", f"out_dir={tmp_path}"]
    code, out, err = warm.run("pipeline", args, env(), 900)
    assert code == 0, (out + err)[-4000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert sorted(rows) == sorted(["simclr", *PIPELINE_ZOO])
    for name, row in rows.items():
        assert row["finetune"] == "slf" and row["dataset"] == "digits" and 0 <= row["RA"] <= row["SA"] <= 100, name
    # what the methods declared: DeACL's teacher is the SimCLR run; DynACL-AIR++ finetunes its post-processing
    deacl_cfg = (tmp_path / "deacl" / "config.yaml").read_text()
    assert str(tmp_path / "simclr" / CHECKPOINT) in deacl_cfg
    post = json.loads((tmp_path / "dynacl_air++-slf" / "results.json").read_text())
    assert post["pretrained"] == str((tmp_path / "dynacl_air++-post" / CHECKPOINT).resolve())
    assert json.loads((tmp_path / "dynacl_air++-cluster" / "clusters.json").read_text())["ks"] == [10]
