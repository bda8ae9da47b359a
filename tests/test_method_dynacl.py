"""DynACL (methods/dynacl.py) against the authors' formulas, written here from train_DynACL.py, the AIR/RCS
reimplementations and the paper's loss, in float64 with explicit loops."""
import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from advcl_dist.config import ConfigError, load_config
from advcl_dist.data.augment import batch_views, to_float
from advcl_dist.engine.objective import StepContext
from advcl_dist.methods import METHODS, PostProcess, build_method, method_values
from advcl_dist.methods.air import invariance_regularisers
from advcl_dist.methods.dynacl import (
    adversarial_weight,
    augmentation_strength,
    dynacl_loss,
    strength_view_settings,
)
from advcl_dist.methods.simclr import view_settings
from advcl_dist.rng import StepRandom

B = 8
TINY = ["data.name=digits", "model.width=4", "model.proj_dim=16", "attack.steps=2", "train.method=dynacl",
        "train.epochs=100", "dynacl.period=10"]


def method_and_model(*overrides):
    cfg = load_config(None, [*TINY, *overrides])
    method = build_method(cfg, 100, torch.device("cpu"))
    torch.manual_seed(0)
    return cfg, method, method.build_model()


# -- the schedule --------------------------------------------------------------------------------------------
def authors_strengths(epochs: int, period: int) -> list[float]:
    """train_DynACL.py's loop over 1-based epochs: the data is reloaded when `epoch % K == 1` (every epoch when
    K == 1) with strength 1 − (epoch − 1) / E, which then holds until the next reload."""
    strengths, strength = [], None
    for epoch in range(1, epochs + 1):
        if epoch % period == 1 or period == 1:
            strength = 1 - (epoch - 1) / epochs
        strengths.append(strength)
    return strengths


@pytest.mark.parametrize("epochs,period", [(1000, 50), (10, 3), (5, 1), (7, 10)])
def test_augmentation_strength_is_the_authors_schedule(epochs, period):
    reference = authors_strengths(epochs, period)
    ours = [augmentation_strength(e, epochs, period) for e in range(epochs)]
    assert ours == pytest.approx(reference, abs=1e-12)


def test_augmentation_strength_at_the_period_boundaries():
    k, e = 50, 1000
    assert augmentation_strength(0, e, k) == 1.0  # first epoch
    assert augmentation_strength(k - 1, e, k) == 1.0  # last epoch of the first period
    assert augmentation_strength(k, e, k) == pytest.approx(1 - k / e)  # first of the second: one step down
    assert augmentation_strength(k + 1, e, k) == pytest.approx(0.95)
    assert augmentation_strength(e - 1, e, k) == pytest.approx(0.05)  # last epoch: 1 − 950/1000


def test_stream_weight_is_tied_to_the_strength():
    rate, k, e = 2 / 3, 50, 1000
    for epoch0 in (0, 49, 50, 51, 500, 999):
        strength = augmentation_strength(epoch0, e, k)
        assert adversarial_weight(strength, rate) == pytest.approx(rate * (1 - strength))  # RCS DynACL.py
        n = epoch0 + 1  # train_DynACL.py: weight_adv = min(1 + (n // K)·(K / E)·λ, 2), 1-based epoch n
        official = min(1 + (n // k) * (k / e) * rate, 2) - 1
        if n % k:  # equal except at the last epoch of a period, where theirs is one period ahead
            assert adversarial_weight(strength, rate) == pytest.approx(official)
        else:
            assert official == pytest.approx(adversarial_weight(strength - k / e, rate))
    assert adversarial_weight(0.0, 1.0) == 1.0 and adversarial_weight(-1.0, 1.0) == 1.0  # the authors' cap


# -- the views -----------------------------------------------------------------------------------------------
def test_strength_one_is_the_simclr_views_and_zero_the_authors_weakest():
    preset = load_config(Path(__file__).parents[1] / "configs" / "cifar10_dynacl.yaml", []).views
    for views in (preset, load_config(None, []).views):
        assert strength_view_settings(1.0, views) == view_settings(views)
    weakest = strength_view_settings(0.0, preset)
    assert weakest["scale"] == (1.0, 1.0) and weakest["jitter"] == (0.0, 0.0, 0.0, 0.0)
    assert weakest["jitter_p"] == 0.0 and weakest["gray_p"] == 0.0
    assert weakest["size"] == preset.size and weakest["padding"] == preset.padding
    s = 0.5  # the authors' get_transform(strength): scale (1 − 0.9 s, 1), ColorJitter(0.4 s, ..., 0.1 s), p 0.8 s
    half = strength_view_settings(s, preset)
    assert half["scale"] == pytest.approx((1.0 - 0.9 * s, 1.0))
    assert half["jitter"] == pytest.approx((0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s))
    assert half["jitter_p"] == pytest.approx(0.8 * s) and half["gray_p"] == pytest.approx(0.2 * s)


def test_views_at_strength_zero_are_the_image_or_its_mirror():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    views = batch_views(images, StepRandom("cpu", 1), crop=False, simclr=2,
                        **strength_view_settings(0.0, load_config(None, []).views))
    x = to_float(images)
    for view in views:
        same = (view - x).abs().flatten(1).amax(1) < 1e-5
        mirrored = (view - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
        assert bool((same | mirrored).all())
    assert not torch.equal(views[0], views[1])  # the flips still differ


# -- the loss ------------------------------------------------------------------------------------------------
def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's NT-Xent as the authors' utils.nt_xent computes it: the 2B rows interleaved (z1_i, z2_i), cosine
    similarities over t, each row's positive its partner, its denominator every row but itself; mean over rows."""
    rows = [r for pair in zip(z1, z2) for r in pair]
    n = len(rows)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        sims = [torch.dot(rows[i], rows[k]) / (rows[i].norm() * rows[k].norm()) / t for k in range(n)]
        partner = i + 1 if i % 2 == 0 else i - 1
        denominator = sum(torch.exp(sims[k]) for k in range(n) if k != i)
        total = total - torch.log(torch.exp(sims[partner]) / denominator)
    return total / n


def test_reweighted_loss_and_its_gradients_match_the_papers_equation():
    torch.manual_seed(0)
    inputs = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    weight, t, c = 0.3, 0.5, 0.5
    ours, parts = dynacl_loss(*inputs, weight, t, c)
    grads = torch.autograd.grad(ours, inputs)
    ref_inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    nat1, nat2, adv1, adv2 = ref_inputs
    nat, adv = reference_nt_xent(nat1, nat2, t), reference_nt_xent(adv1, adv2, t)
    # train_DynACL.py: (nt_xent(clean)·(2 − weight_adv) + nt_xent(adv)·weight_adv) / 2, weight_adv = 1 + w
    reference = (nat * (2 - (1 + weight)) + adv * (1 + weight)) / 2
    ref_grads = torch.autograd.grad(reference, ref_inputs)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    assert parts["loss_nat"].item() == pytest.approx(nat.item(), rel=1e-12)
    assert parts["loss_adv"].item() == pytest.approx(adv.item(), rel=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-12)


@pytest.mark.parametrize("kl_form", ["paper", "authors_code"])
def test_air_option_adds_its_weighted_terms(kl_form):
    torch.manual_seed(1)
    nat1, nat2, adv1, adv2, orig = (torch.randn(6, 5, dtype=torch.float64) for _ in range(5))
    base, _ = dynacl_loss(nat1, nat2, adv1, adv2, 0.2, 0.5, 1.0)
    ours, parts = dynacl_loss(nat1, nat2, adv1, adv2, 0.2, 0.5, 1.0, sir_weight=0.5, air_weight=0.25, orig=orig,
                              kl_form=kl_form)
    sir, air = invariance_regularisers(nat1, nat2, adv1, adv2, 0.5, orig=orig, kl_form=kl_form)
    assert ours.item() == pytest.approx(base.item() + 0.5 * sir.item() + 0.25 * air.item(), rel=1e-12)
    assert parts["sir"].item() == pytest.approx(sir.item()) and parts["air"].item() == pytest.approx(air.item())
    assert abs(sir.item()) > 1e-6 and abs(air.item()) > 1e-6  # the terms are not vacuous here


# -- the attack and the step -------------------------------------------------------------------------------------
def test_attack_is_the_authors_joint_pgd_in_eval_mode():
    """PGD_contrastive: δ1, δ2 together maximise NT-Xent(f_a(t1+δ1), f_a(t2+δ2)) with the network in eval mode
    (running statistics used, none updated), random start from the step's noise stream; float64 loops here."""
    cfg, method, model = method_and_model("attack.steps=3")
    model = model.double()
    reference_model = copy.deepcopy(model).eval()
    t1, t2 = torch.rand(B, 3, 32, 32, dtype=torch.float64), torch.rand(B, 3, 32, 32, dtype=torch.float64)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    ours = method.attack(model, t1, t2, StepRandom("cpu", 3))
    assert model.training  # back in train mode
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())  # nothing updated
    a, x = cfg.attack, torch.cat([t1, t2])
    x_adv = (x + (2 * StepRandom("cpu", 3).noise(x.shape, x.dtype) - 1) * a.eps).clamp(0, 1)
    for _ in range(a.steps):
        x_adv.requires_grad_(True)
        z = reference_model(x_adv, (("pgd", 2 * B),))["proj"]
        (grad,) = torch.autograd.grad(reference_nt_xent(z[:B], z[B:], 0.5), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + a.step_size * grad.sign(), x - a.eps), x + a.eps).clamp(0, 1)
    assert torch.allclose(ours.x_adv, x_adv, atol=1e-10)


@pytest.mark.parametrize("air", [False, True])
def test_training_step_follows_the_schedule_and_reaches_every_parameter(air):
    extra = ["dynacl.sir_weight=0.5", "dynacl.air_weight=0.5", "dynacl.stream_scale=1.0"] if air else []
    cfg, method, model = method_and_model("attack.steps=1", *extra)
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    ctx = StepContext.of_batch(model, images, torch.arange(B), StepRandom("cpu", 0))
    s = cfg.dynacl
    for epoch in (0, 99):
        out = method.training_step(dataclasses.replace(ctx, epoch=epoch, random=StepRandom("cpu", epoch)))
        m = out.metrics
        strength = 1 - math.floor(epoch / s.period) * s.period / cfg.train.epochs
        w = s.weight_rate * (1 - strength)
        assert m["strength"].item() == pytest.approx(strength) and m["adv_weight"].item() == pytest.approx(w)
        expected = s.stream_scale * ((1 - w) * m["loss_nat"] + (1 + w) * m["loss_adv"])
        if air:
            expected = expected + 0.5 * m["sir"] + 0.5 * m["air"]
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert all(not v.requires_grad for v in m.values())
    model.zero_grad()
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP needs every trained parameter in the one forward
    # the training forward updated both branches (the attack none): one update each per step
    assert model.encoder.bn1.bns["pgd"].num_batches_tracked.item() == 2
    assert model.encoder.bn1.bns["normal"].num_batches_tracked.item() == (4 if air else 2)


# -- configuration, post-processing, variants --------------------------------------------------------------------
def test_post_process_declares_lpaff_only_with_post():
    dynacl = METHODS["dynacl"]
    assert dynacl.post_process(load_config(None, TINY)) is None
    cfg = load_config(None, [*TINY, "dynacl.post=true", "dynacl.post_ks=[10]"])
    assert dynacl.post_process(cfg) == PostProcess(method="lpaff", ks=(10,))
    assert METHODS["lpaff"].needs == {"init", "pseudo_labels"}


def test_variants():
    assert method_values("dynacl++") == {"train.method": "dynacl", "dynacl.post": True}
    air = {"dynacl.stream_scale": 1.0, "dynacl.sir_weight": 0.5, "dynacl.air_weight": 0.5}
    assert method_values("dynacl_air") == {"train.method": "dynacl", **air}
    assert method_values("dynacl_air++") == {"train.method": "dynacl", **air, "dynacl.post": True}


@pytest.mark.parametrize("override,key", [("dynacl.period=0", "dynacl.period"),
                                          ("dynacl.weight_rate=1.5", "dynacl.weight_rate"),
                                          ("dynacl.post_ks=[]", "dynacl.post_ks"),
                                          ("dynacl.ir_kl_form=other", "dynacl.ir_kl_form")])
def test_bad_settings_are_named(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [*TINY, override])
