"""RoCL (Kim et al., NeurIPS 2020) against float64 references written from the authors' loss and attack.

The references follow Kim-Minseon/RoCL (src/loss.py NT_xent, src/attack_lib.py RepresentationAdv,
src/rocl_train.py) with explicit loops: the NT-Xent sums −log softmax over each anchor's positives and averages
over anchors, with the key side of the similarity matrix detached; the attack re-forwards t2 at every PGD step
in eval mode; the loss is NT-Xent(t1, t2, t1 + δ) + λ·NT-Xent(t1 + δ, t2) from two separate train-mode forwards.
"""
import copy

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import advcl_dist.data.augment as augment
from advcl_dist.config import ConfigError, load_config
from advcl_dist.engine.objective import StepContext
from advcl_dist.losses import multiview_nt_xent
from advcl_dist.methods import build_method
from advcl_dist.methods.rocl import rocl_nt_xent
from advcl_dist.methods.simclr import simclr_views
from advcl_dist.rng import StepRandom

B = 8
TAU = 0.5


def reference_nt_xent(z: torch.Tensor, tau: float, detach_keys: bool) -> torch.Tensor:
    """Mean over the B·V anchors (i, a) of Σ_{p ≠ a} −log(exp(s_ia,ip) / Σ_{(j, w) ≠ (i, a)} exp(s_ia,jw)),
    s the cosine similarity / τ against the (detached) keys, written out with einsum."""
    b, v, _ = z.shape
    u = z / z.norm(dim=-1, keepdim=True)
    keys = u.detach() if detach_keys else u
    e = torch.exp(torch.einsum("iad,jwd->iajw", u, keys) / tau)  # [B, V, B, V]
    total = z.new_zeros(())
    for a in range(v):
        den = e[:, a].sum(dim=(1, 2)) - e[torch.arange(b), a, torch.arange(b), a]
        for p in range(v):
            if p != a:
                total = total - torch.log(e[torch.arange(b), a, torch.arange(b), p] / den).sum()
    return total / (b * v)


def method_and_model(*overrides):
    cfg = load_config(None, ["data.name=digits", "model.width=4", "model.proj_dim=16", "model.proj_hidden=24",
                             "attack.steps=2", "train.method=rocl", *overrides])
    method = build_method(cfg, 100, torch.device("cpu"))
    torch.manual_seed(0)
    return cfg, method, method.build_model().double()


@pytest.mark.parametrize("views", [2, 3])
@pytest.mark.parametrize("detach_keys", [True, False])
def test_nt_xent_and_its_gradient_match_the_written_out_formula(views, detach_keys):
    z = torch.randn(5, views, 6, dtype=torch.float64, requires_grad=True)
    ours = rocl_nt_xent(z, TAU, detach_keys)
    (grad_ours,) = torch.autograd.grad(ours, z)
    reference = reference_nt_xent(z, TAU, detach_keys)
    (grad_ref,) = torch.autograd.grad(reference, z)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-12)
    # the sum over positives: (V − 1) × the mean-over-positives form of the shared loss, whose value it shares
    assert ours.item() == pytest.approx((views - 1) * multiview_nt_xent(z, TAU).item(), rel=1e-12)


def test_detached_keys_change_the_gradient_not_the_value():
    z = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    (detached,) = torch.autograd.grad(rocl_nt_xent(z, TAU, True), z)
    (full,) = torch.autograd.grad(rocl_nt_xent(z, TAU, False), z)
    assert rocl_nt_xent(z, TAU, True).item() == pytest.approx(rocl_nt_xent(z, TAU, False).item(), rel=1e-12)
    assert not torch.allclose(detached, full, atol=1e-4)


def reference_attack(model, t1, t2, cfg, generator: StepRandom, detach_keys=True):
    """src/attack_lib.py RepresentationAdv.get_loss, loss_type=sim: eval mode, t2 re-forwarded every step."""
    a, plan = cfg.attack, (("normal", t1.shape[0]),)
    model.eval()
    x_adv = (t1 + (2 * generator.noise(t1.shape, t1.dtype) - 1) * a.eps).clamp(0, 1)
    for _ in range(a.steps):
        x_adv.requires_grad_(True)
        z = torch.stack([model(x_adv, plan)["proj"], model(t2, plan)["proj"]], dim=1)
        (grad,) = torch.autograd.grad(reference_nt_xent(z, cfg.loss.temperature, detach_keys), x_adv)
        x_adv = (x_adv.detach() + a.step_size * grad.sign()).clamp(0, 1)
        x_adv = torch.min(torch.max(x_adv, t1 - a.eps), t1 + a.eps)
    model.train()
    return x_adv


def test_attack_equals_the_authors_loop_in_eval_mode_and_leaves_the_statistics_alone():
    cfg, method, model = method_and_model("attack.steps=3")
    reference_model = copy.deepcopy(model)
    t1 = torch.rand(B, 3, 32, 32, dtype=torch.float64)
    t2 = torch.rand_like(t1)
    ours = method.attack(model, t1, t2, StepRandom("cpu", 3))
    reference = reference_attack(reference_model, t1, t2, cfg, StepRandom("cpu", 3))
    assert torch.allclose(ours.x_adv, reference, atol=1e-9)
    assert (ours.x_adv - t1).abs().max() <= cfg.attack.eps + 1e-9 and not torch.allclose(ours.x_adv, t1)
    assert model.training  # restored after the eval-mode attack
    assert model.encoder.bn1.bns["normal"].num_batches_tracked.item() == 0  # running statistics untouched
    assert ours.last_loss > ours.initial_loss  # it ascends the loss


def test_training_step_loss_and_gradients_equal_the_authors_two_forwards(monkeypatch):
    """Float64 throughout (views too): the step's loss and every parameter's gradient against the reference."""
    monkeypatch.setattr(augment, "to_float", lambda images: images.to(torch.float64) / 255.0)
    cfg, method, model = method_and_model()
    reference_model = copy.deepcopy(model)
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    out = method.training_step(StepContext.of_batch(model, images, torch.arange(B), StepRandom("cpu", 0)))
    out.loss.backward()

    generator = StepRandom("cpu", 0)
    t1, t2 = simclr_views(images, generator, cfg.views)
    x_adv = reference_attack(reference_model, t1, t2, cfg, generator)
    z_reg = reference_model(torch.cat([x_adv, t2]), (("normal", 2 * B),))["proj"]
    z_con = reference_model(torch.cat([t1, t2, x_adv]), (("normal", 3 * B),))["proj"]
    loss_reg = reference_nt_xent(torch.stack([z_reg[:B], z_reg[B:]], dim=1), TAU, True)
    loss_con = reference_nt_xent(torch.stack([z_con[:B], z_con[B:2 * B], z_con[2 * B:]], dim=1), TAU, True)
    reference = loss_con + loss_reg / 256
    reference.backward()

    m = out.metrics
    assert set(m) == {"loss", "loss_con", "loss_reg", "attack_gain"}
    assert m["loss_con"].item() == pytest.approx(loss_con.item(), rel=1e-10)
    assert m["loss_reg"].item() == pytest.approx(loss_reg.item(), rel=1e-10)
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-10)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10), name
    ours_bn, ref_bn = model.encoder.bn1.bns["normal"], reference_model.encoder.bn1.bns["normal"]
    assert ours_bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == 2  # two train forwards
    assert torch.allclose(ours_bn.running_mean, ref_bn.running_mean, atol=1e-12)


def test_step_under_bf16_autocast_keeps_an_fp32_loss_and_perturbation():
    cfg, method, model = method_and_model()
    model = model.float()
    seen, attack = {}, method.attack
    method.attack = lambda *args: seen.setdefault("adv", attack(*args))
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(StepContext.of_batch(model, images, torch.arange(B), StepRandom("cpu", 0)))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert seen["adv"].x_adv.dtype == torch.float32
    out.loss.backward()


def test_one_bn_branch_and_a_projection_head_without_batchnorm():
    cfg, method, model = method_and_model()
    assert list(model.encoder.bn1.bns) == ["normal"]
    assert not any(isinstance(m, _BatchNorm) for m in model.projector.modules())
    assert (model.projector.fc1.out_features, model.projector.fc2.out_features) == (24, 16)


def test_negative_regulariser_weight_is_refused_by_name():
    with pytest.raises(ConfigError, match="rocl.reg_weight"):
        load_config(None, ["train.method=rocl", "rocl.reg_weight=-1"])


@pytest.mark.parametrize("preset", ["configs/cifar10_rocl.yaml", "configs/cifar100_rocl.yaml"])
def test_presets_load_with_the_authors_values(preset):
    cfg = load_config(preset, [])
    assert cfg.train.method == "rocl" and cfg.rocl.reg_weight == pytest.approx(1 / 256)
    assert cfg.attack.steps == 7 and cfg.views.crop_scale_min == 0.08 and cfg.model.proj_hidden == 2048
