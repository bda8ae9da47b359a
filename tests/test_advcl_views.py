"""AdvCL's contrastive view sets (`advcl.views`): the joint attack and the training loss over exactly the set's
views, against a float64 NT-Xent written out here from the paper's eq. (5)/(9); the default set bit for bit."""
import numpy as np
import pytest
import torch

from advcl_dist.attacks import pgd
from advcl_dist.config import ConfigError, load_config
from advcl_dist.engine.objective import StepContext
from advcl_dist.methods import VARIANTS, build_method, method_values
from advcl_dist.methods.advcl import advcl_views
from advcl_dist.methods.advcl_views import ADVCL_VIEW_SET, TABLE4_VIEW_SETS, make_views, variant_name
from advcl_dist.models import views_plan
from advcl_dist.rng import StepRandom

B = 8
SETS = [["t1_adv", "t2"], ["t1_adv", "t2_adv"], ["x_adv", "t1", "t2"], ["x_adv", "t1", "t2", "x_l"],
        ["x_adv", "t1", "t2", "x_l", "x_h"]]


def setup(views, *overrides, pseudo_path=None, steps=2):
    cfg = load_config(None, ["data.name=digits", "model.width=4", "model.proj_dim=16", f"attack.steps={steps}",
                             "pseudo.ks=[2,3]", f"advcl.views={views}", *overrides,
                             *([f"pseudo.labels={pseudo_path}"] if pseudo_path else [])])
    method = build_method(cfg, 100, torch.device("cpu"))
    torch.manual_seed(0)
    return cfg, method, method.build_model()


def pseudo_file(tmp_path, columns=((2,), (3,))):
    labels = np.stack([np.arange(100) % k for (k,) in columns], axis=1).astype(np.int64)
    np.save(tmp_path / "pl.npy", labels)
    return tmp_path / "pl.npy", torch.as_tensor(labels)


def reference_nt_xent(z: torch.Tensor, temperature: float, scale: float) -> torch.Tensor:
    """Eq. (5) over V views in float64, written out: anchor (i, a), positives (i, b≠a), denominator every
    other embedding; mean over the B·V anchors; times AdvCL's temperature/base_temperature factor."""
    z = z.double()
    z = z / z.norm(dim=-1, keepdim=True)
    n, v, _ = z.shape
    sim = torch.einsum("iad,jcd->iajc", z, z) / temperature
    total = z.new_zeros(())
    for i in range(n):
        for a in range(v):
            others = torch.ones(n, v, dtype=torch.bool)
            others[i, a] = False
            log_denominator = torch.logsumexp(sim[i, a][others], dim=0)
            total = total - sum(sim[i, a, i, b] - log_denominator for b in range(v) if b != a) / (v - 1)
    return scale * total / (n * v)


def reference_ce(logits, labels) -> torch.Tensor:
    """Mean over heads of the mean −log softmax at the pseudo-label (eq. 10), float64."""
    heads = [(lg.double().logsumexp(1) - lg.double().gather(1, labels[:, k:k + 1]).squeeze(1)).mean()
             for k, lg in enumerate(logits)]
    return sum(heads) / len(heads)


def scale_of(cfg):
    return cfg.loss.temperature / cfg.loss.base_temperature


def reference_projections(model, tokens, inputs):
    """[B, V, D]: each view forwarded alone through its branch (`pgd` for `_adv` tokens)."""
    return torch.stack([model(inputs[t], (("pgd" if t.endswith("_adv") else "normal", B),))["proj"]
                        for t in tokens], dim=1)


@pytest.mark.parametrize("views", SETS)
def test_joint_attack_ascends_the_reference_loss_of_exactly_the_set(views):
    """PGD written out: every δ of the set steps along the sign of the joint loss's gradient (each view forwarded
    alone, the clean views re-forwarded at every step as the authors do); the same x_adv and initial loss."""
    cfg, method, model = setup(views)
    model = model.double()
    g = torch.Generator().manual_seed(1)
    base = {name: torch.rand(B, 3, 32, 32, generator=g, dtype=torch.float64) for name in ("x", "t1", "t2")}
    base["x_l"], base["x_h"] = base["x"] * 0.5, base["x"] * 0.5 - 0.25  # any clean tensors will do here
    adv_tokens = [t for t in views if t.endswith("_adv")]
    clean = [base[t] for t in views if not t.endswith("_adv")]
    starts = [base[t.removesuffix("_adv")] for t in adv_tokens]
    ours = method.attacks(model, base["x"], torch.cat(clean) if clean else None, None, StepRandom("cpu", 3),
                          adv_views=torch.cat(starts))

    a, random = cfg.attack, StepRandom("cpu", 3)
    x_adv = [(s + (2 * random.noise(s.shape, s.dtype) - 1) * a.eps).clamp(0, 1) for s in starts]
    for step in range(a.steps):
        for t in x_adv:
            t.requires_grad_(True)
        inputs = {**{t: base[t] for t in views if t in base}, **dict(zip(adv_tokens, x_adv))}
        loss = reference_nt_xent(reference_projections(model, views, inputs), cfg.loss.temperature, scale_of(cfg))
        if step == 0:
            torch.testing.assert_close(ours.initial_loss.double(), loss.detach(), rtol=1e-6, atol=0)  # pgd reports fp32
        grads = torch.autograd.grad(loss, x_adv)
        x_adv = [torch.min(torch.max(t.detach() + a.step_size * gr.sign(), s - a.eps), s + a.eps).clamp(0, 1)
                 for t, gr, s in zip(x_adv, grads, starts)]
    assert ours.x_adv.shape == (len(adv_tokens) * B, 3, 32, 32) and ours.initial_loss.shape == ()
    torch.testing.assert_close(ours.x_adv, torch.cat(x_adv), atol=1e-6, rtol=0)


class Recorder(torch.nn.Module):
    """Passes forwards through and keeps the last input and plan (the training forward)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, None

    def forward(self, x, plan=None):
        self.seen = (x.detach().clone(), plan)
        return self.inner(x, plan)


@pytest.mark.parametrize("views", SETS)
def test_training_loss_is_the_reference_over_exactly_the_set_and_moves_only_adversarial_views(tmp_path, views):
    path, labels = pseudo_file(tmp_path)
    cfg, method, model = setup(views, pseudo_path=path, steps=1)
    indices = torch.arange(B) * 7
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    recorder = Recorder(model)
    out = method.training_step(StepContext.of_batch(recorder, images, indices, StepRandom("cpu", 4), module=model))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # DDP: every parameter used
    branches_needed = {"pgd", "pgd_ce"} | ({"normal"} if any(not t.endswith("_adv") for t in views) else set())
    assert set(model.encoder.bn1.bns) == branches_needed

    # The training forward's input: the set's views in order, then x + δ_ce.
    seen, plan = recorder.seen
    blocks = seen.split(B)
    assert [name for name, _ in plan] == ["pgd" if t.endswith("_adv") else "normal" for t in views] + ["pgd_ce"]
    made = make_views(images, StepRandom("cpu", 4), cfg.views, 8.0, views)  # the same shared stream
    eps = cfg.attack.eps
    for token, block in zip(views + ["x_adv"], blocks):
        clean = made[token.removesuffix("_adv")]
        if token.endswith("_adv"):
            moved = (block - clean).abs().amax()
            assert 0 < moved <= eps + 1e-6, (token, moved)
        else:
            assert torch.equal(block, clean), token

    # Reference: each view forwarded alone, eq. (5) over exactly these views + λ · eq. (10) on x + δ_ce.
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    inputs = dict(zip(views, blocks))
    z = reference_projections(model, views, inputs)
    loss_con = reference_nt_xent(z, cfg.loss.temperature, scale_of(cfg))
    loss_ce = reference_ce(model(blocks[-1], (("pgd_ce", B),))["pseudo_logits"], labels[indices])
    torch.testing.assert_close(out.metrics["loss_con"].double(), loss_con.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.metrics["loss_ce"].double(), loss_ce.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss.double(), (loss_con + 0.2 * loss_ce).detach(), rtol=1e-5, atol=0)
    (loss_con + 0.2 * loss_ce).backward()
    refs = [p.grad for p in model.parameters()]
    scale = max(ref.abs().max().item() for ref in refs)
    for ours, ref in zip(ours_grads, refs):
        # float32 sums in another order (one forward of every view vs one per view): relative to the gradients' scale
        torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-3, atol=1e-4 * scale)


def test_default_view_set_is_the_four_view_step_bit_for_bit():
    """advcl.views defaults to (x_adv, t1, t2, x_h), and its step is the pre-existing one written out: the four
    views made together, δ on (x+δ, t1, t2, x_h) with the clean projections once, one training forward."""
    cfg, method, model = setup(list(ADVCL_VIEW_SET))
    assert load_config(None, []).advcl.views == list(ADVCL_VIEW_SET)
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = method.training_step(StepContext.of_batch(model, images, torch.arange(B), StepRandom("cpu", 6)))

    model.load_state_dict(state)
    random, a = StepRandom("cpu", 6), cfg.attack
    x, t1, t2, x_h = advcl_views(images, random, cfg.views, 8.0)
    with torch.no_grad():
        z_clean = model(torch.cat([t1, t2, x_h]), views_plan(("normal",) * 3, B))["proj"]
        z_clean = z_clean.reshape(3, B, -1).transpose(0, 1)

    def objective(x_adv):
        return method.contrastive(torch.cat([model(x_adv, (("pgd", B),))["proj"][:, None], z_clean], dim=1))

    adv = pgd(objective, x, a.eps, a.step_size, a.steps, a.random_start, random)
    proj = model(torch.cat([adv.x_adv, t1, t2, x_h]), views_plan(["pgd", "normal", "normal", "normal"], B))["proj"]
    expected = method.contrastive(proj.reshape(4, B, -1).transpose(0, 1))
    assert torch.equal(out.loss, expected)
    assert torch.equal(out.metrics["attack_gain"], expected.detach() - adv.initial_loss)


def test_low_and_high_frequency_views_of_x_sum_to_x():
    """x_l and x_h are the inside and outside of the same disk (radius advcl.hf_radius) of x's spectrum."""
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    views = make_views(images, StepRandom("cpu", 7), load_config(None, []).views, 5.0, ["x_l", "x_h", "t1"])
    torch.testing.assert_close(views["x_l"] + views["x_h"], views["x"], atol=1e-5, rtol=0)
    # x_l is the low band: its spectrum outside the disk (centred, distance >= r) is zero.
    spectrum = torch.fft.fftshift(torch.fft.fft2(views["x_l"].double()), dim=(-2, -1)).abs()
    u = torch.arange(32.0) - 16
    outside = (u[:, None] ** 2 + u[None, :] ** 2).sqrt() >= 5.0
    assert spectrum[..., outside].max() < 1e-3 < spectrum[..., ~outside].max()


def test_a_single_k_of_pseudo_labels_trains(tmp_path):
    """Table 5's settings are config: one K (pseudo.ks=[10]) gives one head and the λ-weighted CE term."""
    path, _ = pseudo_file(tmp_path, columns=((10,),))
    cfg, method, model = setup(list(ADVCL_VIEW_SET), "pseudo.ks=[10]", pseudo_path=path, steps=1)
    assert [head.out_features for head in model.pseudo_heads] == [10]
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    out = method.training_step(StepContext.of_batch(model, images, torch.arange(B), StepRandom("cpu", 0)))
    assert out.loss.item() == pytest.approx(out.metrics["loss_con"].item() + 0.2 * out.metrics["loss_ce"].item(),
                                            rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("views,match", [
    ("[x_adv,t3]", r"unknown view token\(s\) \['t3'\]"),
    ("[x_h_adv,t1]", "x_l and x_h are not images"),
    ("[x_adv]", "fewer than 2 views"),
    ("[x_adv,t1,t1]", r"lists \['t1'\] more than once"),
    ("[t1,t2,x_h]", "train.method=simclr"),
])
def test_bad_view_sets_are_refused_naming_the_key_and_the_tokens(views, match):
    with pytest.raises(ConfigError, match=match) as error:
        load_config(None, [f"advcl.views={views}"])
    message = str(error.value)
    assert "advcl.views" in message and "\n" not in message
    assert "valid tokens" in message or "simclr" in message


def test_the_ablation_sets_are_registered_variants_that_validate():
    for views in TABLE4_VIEW_SETS:
        if views == ADVCL_VIEW_SET:
            assert variant_name(views) not in VARIANTS
            continue
        values = method_values(variant_name(views))
        assert values == {"train.method": "advcl", "advcl.views": list(views)}
        cfg = load_config(None, [f"advcl.views=[{','.join(views)}]"])
        assert cfg.advcl.views == list(views)


def test_zero_pseudo_weight_drops_the_ce_attack_and_heads_but_not_the_contrastive_term(tmp_path):
    """Table 4 without the pseudo-label term (advcl.pseudo_weight=0): no δ_ce, no `pgd_ce` branch, no heads; δ and
    the contrastive loss are those of the λ = 0.2 run (δ's random start is drawn before δ_ce's)."""
    path, _ = pseudo_file(tmp_path)
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    runs = {}
    for weight in (0.0, 0.2):
        cfg, method, model = setup(["x_adv", "t1", "t2", "x_l"], f"advcl.pseudo_weight={weight}",
                                   pseudo_path=path, steps=1)
        runs[weight] = (model, method.training_step(StepContext.of_batch(model, images, torch.arange(B),
                                                                         StepRandom("cpu", 8))))
    model, out = runs[0.0]
    assert len(model.pseudo_heads) == 0 and set(model.encoder.bn1.bns) == {"normal", "pgd"}
    assert "loss_ce" not in out.metrics and torch.equal(out.loss, out.metrics["loss_con"])
    torch.testing.assert_close(out.metrics["loss_con"], runs[0.2][1].metrics["loss_con"], rtol=1e-6, atol=0)
