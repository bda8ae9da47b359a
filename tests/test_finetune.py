"""SLF / ALF / AFF on a tiny pretrained AdvCL encoder, trained by the shared loop; results.json; load_classifier;
transfer; the step-granular schedule."""
import json

import numpy as np
import pytest
import torch

from advcl_dist.config import ConfigError, load_config
from advcl_dist.data.augment import to_float
from advcl_dist.engine import Trainer
from advcl_dist.engine.checkpoint import load_encoder
from advcl_dist.engine.objective import StepContext
from advcl_dist.evaluate import load_classifier
from advcl_dist.finetune import Finetuning, finetune, split_train_val
from advcl_dist.folder_lock import LOCK
from advcl_dist.rng import StepRandom
from dataset_files import write_stl10

TINY = ["data.name=digits", "data.workers=0", "model.width=4", "model.proj_dim=16", "train.batch_size=256",
        "train.epochs=1", "optim.warmup_epochs=0", "attack.steps=1"]
FT = ["finetune.epochs=1", "finetune.batch_size=256", "attack.supervised_steps=2", "attack.eval_steps=2",
      "eval.autoattack=false", "eval.batch_size=360"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """5 steps of AdvCL (three BN branches): enough to have distinct per-branch statistics."""
    out = tmp_path_factory.mktemp("advcl")
    Trainer(load_config(None, [f"out_dir={out}", *TINY])).fit()
    return out / "checkpoint.pt"


def ft_cfg(out, pretrained, *extra):
    return load_config(None, [f"out_dir={out}", *TINY, *FT, f"finetune.checkpoint={pretrained}", *extra])


def state_of(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_slf_trains_only_the_head_and_writes_results_json(tmp_path, pretrained):
    encoder, _ = load_encoder(pretrained)
    finetune(ft_cfg(tmp_path, pretrained, "finetune.mode=slf"))
    model = load_classifier(tmp_path / "classifier.pt")
    assert not changed(state_of(encoder), state_of(model.encoder))  # weights AND BN running statistics
    results = json.loads((tmp_path / "results.json").read_text())
    required = {"dataset", "method", "finetune", "SA", "RA", "AA", "n_test", "attack", "checkpoint"}
    assert required <= results.keys()
    assert (results["dataset"], results["method"], results["finetune"], results["n_test"]) == ("digits", "advcl",
                                                                                             "slf", 360)
    assert results["AA"] is None and results["attack"]["pgd_steps"] == 2 and results["epoch"] == 1
    assert 0 <= results["RA"] <= results["SA"] <= 100
    assert results["checkpoint"] == str((tmp_path / "classifier.pt").resolve())


def trainer_of(cfg):
    return Trainer(cfg, objective=Finetuning(cfg))


def test_load_classifier_reproduces_the_finetuned_model_with_the_pgd_bn_branch(tmp_path, pretrained):
    finetuner = trainer_of(ft_cfg(tmp_path, pretrained, "finetune.mode=slf"))
    finetuner.fit()
    loaded = load_classifier(tmp_path / "classifier.pt")
    x = torch.rand(8, 3, 32, 32)
    finetuner.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), finetuner.model(x))
        # Independent path: the pretrained encoder with its `pgd` BN branch, then the saved head.
        encoder, info = load_encoder(pretrained)
        assert info["branches"] == ["normal", "pgd"]  # no pseudo-labels: no δ_ce, no `pgd_ce` branch
        expected = loaded.head(encoder(x, (("pgd", 8),)))
        other = loaded.head(encoder(x, (("normal", 8),)))
    torch.testing.assert_close(loaded(x), expected)
    assert not torch.allclose(expected, other)  # the branch choice matters


@pytest.mark.parametrize("mode", ["alf", "aff"])
def test_alf_and_aff_run_and_train_the_right_parameters(tmp_path, pretrained, mode):
    finetuner = trainer_of(ft_cfg(tmp_path, pretrained, f"finetune.mode={mode}"))
    before = state_of(finetuner.model)
    finetuner.fit()
    after = state_of(finetuner.model)
    moved = changed(before, after)
    assert {"head.weight", "head.bias"} <= moved
    encoder_moved = {k for k in moved if k.startswith("encoder.")}
    if mode == "alf":
        assert not encoder_moved
    else:  # AFF trains the whole network; only the chosen BN branch sees data
        assert "encoder.conv1.weight" in encoder_moved
        assert "encoder.bn1.bns.pgd.running_mean" in encoder_moved
        assert not {k for k in encoder_moved if ".bns.normal." in k or ".bns.pgd_ce." in k}
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["loss"])


def test_alf_head_sees_adversarial_examples(tmp_path, pretrained):
    """The ALF loss on a batch is the CE of PGD examples: above the clean CE of the same crop."""
    cfg = ft_cfg(tmp_path, pretrained, "finetune.mode=alf", "attack.supervised_steps=5", "attack.eps=0.1",
                 "attack.step_size=0.02", "attack.random_start=false")
    alf = trainer_of(cfg)
    alf.loader.set_epoch(0)
    images, labels, indices = next(iter(alf.loader))
    alf.objective.train_mode(alf.model)

    def loss(objective):
        ctx = StepContext.of_batch(alf.model, images, indices, StepRandom("cpu", 0).reseed(3), labels=labels)
        return objective.training_step(ctx).loss  # same crop: the step's random source replays it

    adv_loss = loss(alf.objective)
    alf.objective.mode = "slf"
    assert adv_loss > loss(alf.objective) + 0.01


def test_lr_drops_by_gamma_at_each_milestone_epoch_on_the_step_schedule(tmp_path, pretrained):
    """MultiStepLR(milestones, gamma) of the authors' loop, on the loop's per-step scheduler."""
    cfg = ft_cfg(tmp_path, pretrained, "finetune.epochs=4", "finetune.milestones=[1,3]", "finetune.lr=0.05",
                 "train.log_every=1")
    finetune(cfg, evaluate_after=False)
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    steps = 1437 // 256  # whole global batches per epoch
    for step, lr in lrs.items():
        epoch = (step - 1) // steps  # the lr logged at step s is the one step s trained with
        assert lr == pytest.approx(0.05 * 0.1 ** ((epoch >= 1) + (epoch >= 3))), step


def test_val_fraction_holds_out_a_disjoint_split_and_selects_on_it(tmp_path, pretrained):
    train, val = split_train_val(1437, 0.2, seed=0)
    assert len(val) == 287 and not set(train) & set(val) and len(set(train) | set(val)) == 1437
    finetune(ft_cfg(tmp_path, pretrained, "finetune.val_fraction=0.2", "finetune.epochs=2"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["selected_by"] == "val_RA" and results["epoch"] in (1, 2)


def test_finished_finetuning_is_not_repeated(tmp_path, pretrained, capsys):
    cfg = ft_cfg(tmp_path, pretrained)
    finetune(cfg, evaluate_after=False)
    stamp = (tmp_path / "classifier.pt").stat().st_mtime_ns
    finetune(cfg, evaluate_after=False)
    assert "already finished" in capsys.readouterr().out
    assert (tmp_path / "classifier.pt").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "run.json").read_text())["stage"] == "finetune"


def test_transfer_to_stl10_resizes_to_the_pretraining_size(tmp_path, pretrained):
    write_stl10(tmp_path)
    out = tmp_path / "run"
    finetune(ft_cfg(out, pretrained, "finetune.dataset=stl10", f"finetune.root={tmp_path}", "finetune.batch_size=3"))
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "stl10" and results["n_test"] == 2
    model = load_classifier(out / "classifier.pt")
    assert model.head.out_features == 10
    with torch.no_grad():
        assert model(to_float(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))).shape == (1, 10)


def test_load_classifier_of_a_pretraining_checkpoint_says_to_finetune_it_first(pretrained):
    with pytest.raises(ConfigError, match="must be finetuned first"):
        load_classifier(pretrained)


def test_a_classifier_of_another_architecture_in_out_dir_is_a_clear_error_and_is_kept(tmp_path, pretrained):
    """Finetuning into a folder whose classifier.pt came from another encoder (width 8, not 4)."""
    wide = tmp_path / "wide"
    Trainer(load_config(None, [f"out_dir={wide}", *TINY, "model.width=8"])).fit(stop_after_steps=1)
    out = tmp_path / "ft"
    finetune(ft_cfg(out, wide / "checkpoint.pt"), evaluate_after=False)
    def files():  # the lock file records its latest holder: not an output
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK}

    before = files()
    with pytest.raises(ConfigError, match=r"classifier.pt belongs to another run \(finetune.checkpoint: .*out_dir"):
        finetune(ft_cfg(out, pretrained), evaluate_after=False)
    assert files() == before
