import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advcl_dist.config import load_config
from advcl_dist.engine.objective import StepContext
from advcl_dist.losses import multiview_nt_xent
from advcl_dist.methods import METHODS, build_method
from advcl_dist.methods.advcl import load_pseudo_labels
from advcl_dist.rng import StepRandom
from advcl_dist.views import high_frequency

B = 8


def method_and_model(*overrides):
    cfg = load_config(None, ["data.name=digits", "model.width=4", "model.proj_dim=16", "attack.steps=3",
                             "pseudo.ks=[2,3]", *overrides])
    method = build_method(cfg, 100, torch.device("cpu"))
    torch.manual_seed(0)
    return cfg, method, method.build_model().double()


def test_methods_are_registered_by_name():
    assert {"advcl", "simclr"} <= set(METHODS)


def reference_attacks(model, x, t1, t2, x_h, pseudo, cfg, generator: StepRandom):
    """The authors' algorithm: two PGD loops one after the other; each step of the contrastive one
    re-forwards every view separately (BN in train mode). The random starts are drawn in turn from
    `generator`'s noise stream."""
    a = cfg.attack

    def contrastive(x_adv):
        z = [model(x_adv, (("pgd", B),))["proj"]] + [model(v, (("normal", B),))["proj"] for v in (t1, t2, x_h)]
        return multiview_nt_xent(torch.stack(z, dim=1), cfg.loss.temperature)

    def pseudo_ce(x_adv):
        logits = model(x_adv, (("pgd_ce", B),))["pseudo_logits"]
        return sum(F.cross_entropy(lg, pseudo[:, k]) for k, lg in enumerate(logits)) / len(logits)

    results = []
    for objective in (contrastive,) if pseudo is None else (contrastive, pseudo_ce):
        noise = generator.noise(x.shape, x.dtype)
        x_adv = (x + (2 * noise - 1) * a.eps).clamp(0, 1)
        for _ in range(a.steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + a.step_size * grad.sign(), x - a.eps), x + a.eps)
            x_adv = x_adv.clamp(0, 1)
        results.append(x_adv)
    return results


@pytest.mark.parametrize("fuse", [True, False])
def test_attacks_with_clean_projections_computed_once_equal_the_authors_two_loops(tmp_path, fuse):
    """δ and δ_ce, found together (advcl.fuse_attacks: one forward of [x+δ; x+δ_ce] per step) or one after the other,
    with the clean views projected once, equal the authors' two loops in float64; the BN branches' running
    statistics see the same batches."""
    labels = np.stack([np.arange(100) % 2, np.arange(100) % 3], axis=1).astype(np.int64)
    np.save(tmp_path / "pl.npy", labels)
    cfg, method, model = method_and_model(f"pseudo.labels={tmp_path / 'pl.npy'}", f"advcl.fuse_attacks={fuse}")
    reference_model = copy.deepcopy(model)
    x = torch.rand(B, 3, 32, 32, dtype=torch.float64)
    t1, t2 = torch.rand_like(x), torch.rand_like(x)
    x_h = high_frequency(x)
    pseudo = torch.as_tensor(labels[:B])
    ours = method.attacks(model, x, torch.cat([t1, t2, x_h]), pseudo, StepRandom("cpu", 3))
    x_con, x_ce = reference_attacks(reference_model, x, t1, t2, x_h, pseudo, cfg, StepRandom("cpu", 3))
    assert ours.x_adv.shape == (2 * B, 3, 32, 32) and ours.initial_loss.shape == (2,)
    assert torch.allclose(ours.x_adv[:B], x_con, atol=1e-6) and torch.allclose(ours.x_adv[B:], x_ce, atol=1e-6)
    assert not torch.allclose(x_con, x_ce, atol=1e-3)  # two different attacks
    assert (ours.x_adv - torch.cat([x, x])).abs().max() <= cfg.attack.eps + 1e-6
    for branch in ("pgd", "pgd_ce"):
        ours_bn, ref_bn = model.encoder.bn1.bns[branch], reference_model.encoder.bn1.bns[branch]
        assert ours_bn.num_batches_tracked == ref_bn.num_batches_tracked == cfg.attack.steps
        assert torch.allclose(ours_bn.running_mean, ref_bn.running_mean, atol=1e-9)


def test_attack_without_pseudo_labels_is_the_contrastive_one_alone():
    cfg, method, model = method_and_model()
    x = torch.rand(B, 3, 32, 32, dtype=torch.float64)
    t1, t2 = torch.rand_like(x), torch.rand_like(x)
    x_h = high_frequency(x)
    ours = method.attacks(model, x, torch.cat([t1, t2, x_h]), None, StepRandom("cpu", 3))
    (reference,) = reference_attacks(copy.deepcopy(model), x, t1, t2, x_h, None, cfg, StepRandom("cpu", 3))
    assert ours.x_adv.shape == x.shape and ours.initial_loss.shape == ()
    assert torch.allclose(ours.x_adv, reference, atol=1e-6)


def test_advcl_step_with_pseudo_labels(tmp_path):
    labels = np.stack([np.arange(100) % 2, np.arange(100) % 3], axis=1).astype(np.int32)
    np.save(tmp_path / "pl.npy", labels)
    cfg, method, model = method_and_model(f"pseudo.labels={tmp_path / 'pl.npy'}")
    model = model.float()
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    out = method.training_step(StepContext.of_batch(model, images, torch.arange(B) * 7, StepRandom("cpu", 0)))
    m = out.metrics
    assert set(m) == {"loss", "loss_con", "loss_ce", "attack_gain"}
    assert out.loss.item() == pytest.approx(m["loss_con"].item() + 0.2 * m["loss_ce"].item(), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in model.pseudo_heads.parameters())
    # the pgd_ce branch saw exactly the attack's steps plus the training forward
    assert model.encoder.bn1.bns["pgd_ce"].num_batches_tracked.item() == cfg.attack.steps + 1


def test_advcl_without_pseudo_labels_has_no_ce_term():
    cfg, method, model = method_and_model()
    assert len(model.pseudo_heads) == 0
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    out = method.training_step(StepContext.of_batch(model.float(), images,
                               torch.arange(B), StepRandom("cpu", 0)))
    assert "loss_ce" not in out.metrics and torch.isfinite(out.loss)
    assert out.metrics["attack_gain"] > 0  # the attack raised the contrastive loss


def test_simclr_step_uses_two_views_and_only_the_normal_branch():
    cfg, method, model = method_and_model("train.method=simclr")
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    out = method.training_step(StepContext.of_batch(model.float(), images,
                               torch.arange(B), StepRandom("cpu", 0)))
    out.loss.backward()
    assert list(model.encoder.bn1.bns) == ["normal"]
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("array,match", [(np.zeros((99, 2), np.int32), "shape"),
                                         (np.zeros((100, 2), np.float32), "dtype"),
                                         (np.full((100, 2), 2, np.int32), "K=2")])
def test_bad_pseudo_label_files_are_named(tmp_path, array, match):
    np.save(tmp_path / "pl.npy", array)
    with pytest.raises(ValueError, match=match):
        load_pseudo_labels(tmp_path / "pl.npy", 100, [2, 3])


def test_advcl_step_under_bf16_autocast_keeps_fp32_loss_and_perturbation():
    cfg, method, model = method_and_model()
    model = model.float()
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    seen = {}
    original = method.attacks

    def spy(*args, **kwargs):
        seen["attack"] = original(*args, **kwargs)
        return seen["attack"]

    method.attacks = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(StepContext.of_batch(model, images, torch.arange(B), StepRandom("cpu", 0)))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert seen["attack"].x_adv.dtype == torch.float32
    out.loss.backward()


def test_supervised_at_trains_a_classifier_on_pgd10_examples_of_the_true_labels():
    cfg = load_config(None, ["data.name=digits", "model.width=4", "train.method=supervised_at",
                             "attack.supervised_steps=10"])
    method = build_method(cfg, 100, torch.device("cpu"), num_classes=10)
    torch.manual_seed(0)
    model = method.build_model()
    assert model.projector is None and [h.out_features for h in model.pseudo_heads] == [10]
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(B) % 10
    out = method.training_step(StepContext.of_batch(model, images, torch.arange(B), StepRandom("cpu", 0),
                                                    labels=labels))
    # Reference: the same crop and the same random start, then ten signed-gradient steps written out.
    from advcl_dist.data.augment import crop_flip_view

    random = StepRandom("cpu", 0)  # replayed: the crop from its shared stream, the start from its noise
    x = crop_flip_view(images, random, size=32, padding=4)
    a = cfg.attack
    x_adv = (x + (2 * random.noise(x.shape, x.dtype) - 1) * a.eps).clamp(0, 1)
    for _ in range(10):
        x_adv.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x_adv)["pseudo_logits"][0], labels)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + a.step_size * grad.sign(), x - a.eps), x + a.eps).clamp(0, 1)
    expected = torch.nn.functional.cross_entropy(model(x_adv)["pseudo_logits"][0], labels)
    torch.testing.assert_close(out.loss, expected)
    clean = torch.nn.functional.cross_entropy(model(x)["pseudo_logits"][0], labels)
    assert out.loss > clean


def test_supervised_at_refuses_a_split_with_unlabelled_images_before_training():
    cfg = load_config(None, ["data.name=stl10", "data.split=train+unlabeled", "train.method=supervised_at"])
    with pytest.raises(ValueError, match=r"data.split=train\+unlabeled .*data.split=train"):
        build_method(cfg, 105000, torch.device("cpu"), num_classes=10)


@pytest.mark.parametrize("name", ["advcl", "supervised_at"])
def test_eps_ramp_attacks_with_the_share_of_eps_and_step_size_of_its_step(name):
    """attack.eps_ramp_epochs=2 with 10 steps an epoch: step 4 (0-based) attacks with 5/20 of ε and of the step
    size, exactly as a constant-ε run configured with those values; from step 19 on, with all of them."""
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(B) % 10

    def loss(step, *overrides):
        cfg = load_config(None, ["data.name=digits", "model.width=4", "model.proj_dim=16", "attack.steps=3",
                                 f"train.method={name}", *overrides])
        method = build_method(cfg, 100, torch.device("cpu"), num_classes=10)
        torch.manual_seed(0)
        model = method.build_model()
        ctx = StepContext(step=step, epoch=0, total_steps=100, steps_per_epoch=10, random=StepRandom("cpu", 1),
                          model=model, module=model, images=images, labels=labels,
                          indices=torch.arange(B))
        return method.training_step(ctx).loss.item()

    eps, step_size = 8 / 255, 2 / 255
    ramped = loss(4, "attack.eps_ramp_epochs=2")
    assert ramped == loss(4, f"attack.eps={eps * 5 / 20}", f"attack.step_size={step_size * 5 / 20}")
    assert ramped != loss(4)
    assert loss(19, "attack.eps_ramp_epochs=2") == loss(19)
