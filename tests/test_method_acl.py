"""ACL (Jiang et al., NeurIPS 2020): attacks, losses and BN branches of a2a / a2s / ds (+ SIR/AIR) against float64
references written here from the paper's NT-Xent (SimCLR eq. 1) and the authors' train_simCLR.py."""
import copy

import pytest
import torch

from advcl_dist.config import ConfigError, load_config
from advcl_dist.engine.objective import StepContext
from advcl_dist.methods import VARIANTS, build_method
from advcl_dist.methods.acl import ACLSettings, original_image
from advcl_dist.rng import StepRandom

B, T = 8, 0.5


def method_and_model(*overrides, steps=2):
    cfg = load_config(None, ["train.method=acl", "data.name=digits", "model.width=4", "model.proj_dim=16",
                             f"attack.steps={steps}", *overrides])
    method = build_method(cfg, 100, torch.device("cpu"))
    torch.manual_seed(0)
    return cfg, method, method.build_model().double()


def variant_overrides(name):
    return [f"{key}={value}" for key, value in VARIANTS[name].items()]


def nt_xent_reference(z1, z2, t):
    """SimCLR's NT-Xent of the pair: mean over the 2B anchors of −log exp(cos(i, pos)/t) / Σ_{k≠i} exp(cos(i, k)/t)."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n, half, total = z.shape[0], z1.shape[0], 0
    for i in range(n):
        positive = (i + half) % n
        denominator = sum(torch.exp(torch.dot(z[i], z[k]) / t) for k in range(n) if k != i)
        total = total - torch.log(torch.exp(torch.dot(z[i], z[positive]) / t) / denominator)
    return total / n


def batch_distribution(a, b, t):
    s = torch.exp(torch.einsum("kd,kd->k", a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)) / t)
    return s / s.sum()


def regularisers_reference(nat1, nat2, adv1, adv2, orig, t):
    """Xu et al. 2023: SIR = KL(p1(y|x) ‖ p2(y|x)), AIR = KL(p1(y|x̃)p1(x̃|x) ‖ p2(y|x̃)p2(x̃|x)), summed over B."""
    p1, p2 = batch_distribution(orig, nat1, t), batch_distribution(orig, nat2, t)
    q1 = batch_distribution(orig, adv1, t) * batch_distribution(adv1, nat1, t)
    q2 = batch_distribution(orig, adv2, t) * batch_distribution(adv2, nat2, t)
    return (p1 * (p1 / p2).log()).sum(), (q1 * (q1 / q2).log()).sum()


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(3)]


def proj(model, x, branch):
    """A separate forward of one input in one BN batch, as the authors' `model.train()(inputs, bn_name)`."""
    return model(x, ((branch, x.shape[0]),))["proj"]


CASES = {  # variant overrides → reference loss of (model, t1, t2, x_adv, orig)
    "a2a": (["acl.variant=a2a"], lambda m, t1, t2, xa, o: nt_xent_reference(*proj(m, xa, "pgd").chunk(2), T)),
    "a2s": (["acl.variant=a2s"],
            lambda m, t1, t2, xa, o: nt_xent_reference(proj(m, xa, "pgd"), proj(m, t2, "normal"), T)),
    "ds": (["acl.std_weight=0.3", "acl.adv_weight=0.9"],
           lambda m, t1, t2, xa, o: 0.3 * nt_xent_reference(*proj(m, torch.cat([t1, t2]), "normal").chunk(2), T)
           + 0.9 * nt_xent_reference(*proj(m, xa, "pgd").chunk(2), T)),
}


def ds_ir_reference(m, t1, t2, xa, o):
    nat1, nat2 = proj(m, torch.cat([t1, t2]), "normal").chunk(2)
    adv1, adv2 = proj(m, xa, "pgd").chunk(2)
    sir, air = regularisers_reference(nat1, nat2, adv1, adv2, proj(m, o, "normal"), T)
    return nt_xent_reference(nat1, nat2, T) + nt_xent_reference(adv1, adv2, T) + 0.5 * sir + 0.5 * air


CASES["acl_air"] = (variant_overrides("acl_air"), ds_ir_reference)


@pytest.mark.parametrize("case", list(CASES))
def test_training_loss_and_gradients_equal_the_reference(case):
    overrides, reference = CASES[case]
    _, method, model = method_and_model(*overrides)
    ref_model = copy.deepcopy(model)
    t1, t2, orig = images()
    x_adv = torch.cat([t1, t2]).clamp(0, 1) if case != "a2s" else t1.flip(-1)
    x_adv = (x_adv + 0.01).clamp(0, 1)
    loss, parts = method.training_loss(model, t1, t2, x_adv, orig)
    expected = reference(ref_model, t1, t2, x_adv, orig)
    assert torch.allclose(loss, expected, atol=1e-10), (loss.item(), expected.item())
    loss.backward()
    expected.backward()
    for (name, p), ref_p in zip(model.named_parameters(), ref_model.parameters()):
        assert (p.grad is None) == (ref_p.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, ref_p.grad, atol=1e-10), name
    if case == "acl_air":
        assert {"loss_std", "loss_adv", "sir", "air"} <= set(parts)


def test_ds_default_weights_halve_the_sum_of_the_two_streams():
    """train_simCLR.py: loss = (nt_xent(clean pair) + nt_xent(adversarial pair)) / 2."""
    assert (ACLSettings().std_weight, ACLSettings().adv_weight) == (0.5, 0.5)
    _, method, model = method_and_model()
    t1, t2, _ = images()
    loss, parts = method.training_loss(model, t1, t2, torch.cat([t1, t2]).flip(-2))
    assert torch.allclose(loss, (parts["loss_std"] + parts["loss_adv"]) / 2, atol=1e-12)
    assert not torch.allclose(parts["loss_std"], parts["loss_adv"])


def reference_attack(model, t1, t2, variant, cfg, generator):
    """PGD_contrastive: uniform start, `steps` signed steps of the NT-Xent through `pgd` with the model in eval
    mode, projected to the ε-ball and [0, 1]; a2s perturbs t1 only, against the standard view f_n(t2)."""
    a = cfg.attack
    x = t1 if variant == "a2s" else torch.cat([t1, t2])
    x_adv = (x + (2 * generator.noise(x.shape, x.dtype) - 1) * a.eps).clamp(0, 1)
    model.eval()
    for _ in range(a.steps):
        x_adv.requires_grad_(True)
        if variant == "a2s":
            loss = nt_xent_reference(proj(model, x_adv, "pgd"), proj(model, t2, "normal").detach(), T)
        else:
            loss = nt_xent_reference(*proj(model, x_adv, "pgd").chunk(2), T)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + a.step_size * grad.sign(), x - a.eps), x + a.eps).clamp(0, 1)
    model.train()
    return x_adv


def bn_counts(model):
    return {name: int(bn.num_batches_tracked) for name, bn in model.encoder.bn1.bns.items()}


@pytest.mark.parametrize("variant", ["a2a", "a2s", "ds"])
def test_attack_equals_the_authors_pgd_in_eval_mode(variant):
    cfg, method, model = method_and_model(f"acl.variant={variant}")
    ref_model = copy.deepcopy(model)
    t1, t2, _ = images(1)
    before = bn_counts(model)
    adv = method.attack(model, t1, t2, StepRandom("cpu", 5))
    expected = reference_attack(ref_model, t1, t2, variant, cfg, StepRandom("cpu", 5))
    assert adv.x_adv.shape == expected.shape == ((B if variant == "a2s" else 2 * B), 3, 32, 32)
    assert torch.allclose(adv.x_adv, expected, atol=1e-9)
    clean = t1 if variant == "a2s" else torch.cat([t1, t2])
    assert (adv.x_adv - clean).abs().max() <= cfg.attack.eps + 1e-9 and (adv.x_adv != clean).any()
    assert model.training and bn_counts(model) == before  # eval-mode attack: running statistics untouched


def test_attack_in_train_mode_updates_the_pgd_branch_statistics():
    cfg, method, model = method_and_model("acl.attack_bn_eval=false")
    t1, t2, _ = images(1)
    method.attack(model, t1, t2, StepRandom("cpu", 5))
    assert bn_counts(model) == {"normal": 0, "pgd": cfg.attack.steps}


class PlanRecorder(torch.nn.Module):
    """The model, recording the BN plan (branch, rows) of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.plans = model, []

    def forward(self, x, plan):
        self.plans.append(tuple(plan))
        return self.model(x, plan)


@pytest.mark.parametrize("case, branches, attack_plans, train_plan", [
    ("a2a", ("normal",), [(("pgd", 2 * B),)] * 2, (("pgd", 2 * B),)),
    ("a2s", ("normal", "pgd"), [(("normal", B),)] + [(("pgd", B),)] * 2, (("pgd", B), ("normal", B))),
    ("ds", ("normal", "pgd"), [(("pgd", 2 * B),)] * 2, (("pgd", 2 * B), ("normal", 2 * B))),
    ("acl_air", ("normal", "pgd"), [(("pgd", 2 * B),)] * 2, (("pgd", 2 * B), ("normal", 2 * B), ("normal", B))),
])
def test_each_forward_uses_the_authors_branches(case, branches, attack_plans, train_plan):
    overrides = variant_overrides("acl_air") if case == "acl_air" else [f"acl.variant={case}"]
    _, method, model = method_and_model(*overrides)
    assert tuple(model.encoder.bn1.bns) == branches == method.branches
    recorder = PlanRecorder(model.float())
    ctx = StepContext.of_batch(recorder, torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8), torch.arange(B),
                               StepRandom("cpu", 0))
    method.training_step(ctx)
    assert recorder.plans == attack_plans + [train_plan]


def test_poisoned_pgd_branch_changes_only_the_adversarial_stream():
    _, method, model = method_and_model()
    t1, t2, _ = images()
    x_adv = (torch.cat([t1, t2]) + 0.01).clamp(0, 1)
    _, clean = method.training_loss(model, t1, t2, x_adv)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "bns") and "pgd" in module.bns:
                module.bns["pgd"].weight.mul_(-3.0)
                module.bns["pgd"].bias.add_(0.7)
    _, poisoned = method.training_loss(model, t1, t2, x_adv)
    assert torch.equal(poisoned["loss_std"], clean["loss_std"])
    assert abs(poisoned["loss_adv"] - clean["loss_adv"]) > 1e-3


def test_original_image_for_air_is_the_stored_image_at_the_views_size():
    stored = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(original_image(stored, 32), stored.float() / 255)
    assert original_image(torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8), 32).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("case", ["a2a", "a2s", "ds", "acl_air"])
def test_a_training_step_runs_and_moves_every_weight_that_gets_a_gradient(case):
    overrides = variant_overrides(case) if case == "acl_air" else [f"acl.variant={case}"]
    _, method, model = method_and_model(*overrides, steps=1)
    model = model.float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = StepContext.of_batch(model, torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8), torch.arange(B),
                               StepRandom("cpu", 1))
    out = method.training_step(ctx)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) and v.dim() == 0 for v in out.metrics.values())
    out.loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused  # DDP needs every parameter in the one training forward
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "encoder.conv1" in n)


@pytest.mark.parametrize("override, key", [
    ("acl.variant=a2b", "acl.variant"),
    ("acl.temperature=0", "acl.temperature"),
    ("acl.adv_weight=-1", "acl.adv_weight"),
    ("acl.ir_kl_form=reverse", "acl.ir_kl_form"),
])
def test_bad_settings_are_a_config_error(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["train.method=acl", override])


def test_regularisers_need_the_dual_stream():
    with pytest.raises(ConfigError, match="acl.variant.*ds"):
        load_config(None, ["train.method=acl", "acl.variant=a2s", "acl.air_weight=0.5"])


def test_variants_are_registered():
    assert VARIANTS["acl_a2a"] == {"train.method": "acl", "acl.variant": "a2a"}
    assert VARIANTS["acl_a2s"] == {"train.method": "acl", "acl.variant": "a2s"}
    air = VARIANTS["acl_air"]
    assert air["acl.variant"] == "ds" and air["acl.sir_weight"] == air["acl.air_weight"] == 0.5
    assert air["acl.std_weight"] == air["acl.adv_weight"] == 1.0
