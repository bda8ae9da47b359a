"""AP-DPE (methods/apdpe.py) against float64 references written here from the authors' equations:

CE_t = mean_i (logsumexp(z_i) − z_i[y_i]); per image the tasks' input gradients, each over (‖·‖ + 1e-10), give
M_i = ĜᵀĜ + 1e-5·I and h = mean_i log det M_i (determinants expanded by hand); the attack ascends
J = Σ_t CE_t(u_t) + λh, each view forwarded on its own (the authors' separate calls); the loss is
(Σ clean CE + Σ adversarial CE) / (2T) + λh.
"""
import copy

import pytest
import torch

from advcl_dist.config import ConfigError, load_config, with_overrides
from advcl_dist.engine.objective import StepContext
from advcl_dist.methods import VARIANTS, build_method, method_values
from advcl_dist.methods.apdpe import PretextBatch, gradient_logdet, pretext_loss
from advcl_dist.rng import StepRandom

B = 8
EPS_I = 1e-5


def method_and_model(*overrides, dtype=torch.float64):
    cfg = load_config(None, ["train.method=apdpe", "data.name=digits", "model.width=4", *overrides])
    method = build_method(cfg, 100, torch.device("cpu"))
    torch.manual_seed(0)
    return cfg, method, method.build_model().to(dtype)


def images(seed=0):
    return torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def ce_reference(logits, labels):
    return torch.stack([torch.logsumexp(logits[i], 0) - logits[i, labels[i]] for i in range(len(labels))]).mean()


def logdet_reference(grads):
    """mean_i log det(ĜᵀĜ + 1e-5 I) with 2×2 / 3×3 determinants written out."""
    values = []
    for i in range(grads[0].shape[0]):
        cols = [g[i].flatten() / (g[i].flatten().pow(2).sum().sqrt() + 1e-10) for g in grads]
        m = [[cols[r] @ cols[c] + (EPS_I if r == c else 0.0) for c in range(len(cols))] for r in range(len(cols))]
        if len(cols) == 2:
            det = m[0][0] * m[1][1] - m[0][1] * m[1][0]
        else:
            det = (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                   + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
        values.append(torch.log(det))
    return torch.stack(values).mean()


def double_batch(method, seed=1):
    batch = method.pretext_batch(images(), StepRandom("cpu", seed))
    return PretextBatch(batch.views.double(), batch.labels)


def reference_task_losses(model, views, labels, create_graph=False):
    """CE_t of each task's view, forwarded alone; with create_graph, also each ∂CE_t/∂view (kept differentiable)."""
    losses, grads = [], []
    for t, view in enumerate(views):
        loss = ce_reference(model(view, (("normal", B),))["pseudo_logits"][t], labels[t])
        losses.append(loss)
        if create_graph:
            grads.append(torch.autograd.grad(loss, view, create_graph=True)[0])
    return losses, grads


@pytest.mark.parametrize("tasks", [2, 3])
def test_gradient_logdet_and_its_gradient_equal_the_determinant_by_hand(tasks):
    torch.manual_seed(0)
    grads = [torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True) for _ in range(tasks)]
    grads[1].data[0] = grads[0].data[0] * 3 + 1e-3 * grads[1].data[0]  # nearly parallel for image 0
    ours, ref = gradient_logdet(grads), logdet_reference(grads)
    assert torch.allclose(ours, ref, rtol=1e-10)
    assert torch.allclose(torch.stack(torch.autograd.grad(ours, grads)), torch.stack(torch.autograd.grad(ref, grads)),
                          rtol=1e-7, atol=1e-12)


def test_pretext_loss_is_the_mean_of_clean_and_adversarial_ce_plus_the_penalty():
    torch.manual_seed(0)
    clean, adv = list(torch.rand(2, dtype=torch.float64)), list(torch.rand(2, dtype=torch.float64))
    grads = [torch.randn(4, 3, 5, 5, dtype=torch.float64) for _ in range(2)]
    loss, h = pretext_loss(clean, adv, grads, 0.1)
    assert torch.allclose(loss, (clean[0] + clean[1] + adv[0] + adv[1]) / 4 + 0.1 * logdet_reference(grads))
    assert torch.allclose(h, logdet_reference(grads))
    single, none = pretext_loss(clean[:1], adv[:1], None, 0.1)  # one task: the authors' single-task loss
    assert none is None and torch.allclose(single, (clean[0] + adv[0]) / 2)
    assert pretext_loss(clean, adv, grads, 0.0)[1] is None


@pytest.mark.parametrize("tasks", ["[rotation,jigsaw]", "[jigsaw]"])
def test_attack_equals_two_float64_pgd_steps_on_the_reference_objective(tasks):
    cfg, method, model = method_and_model(f"apdpe.tasks={tasks}", "attack.steps=2")
    reference_model = copy.deepcopy(model)
    batch = double_batch(method)
    ours = method.attack(model, batch, StepRandom("cpu", 4))
    assert all(p.grad is None for p in model.parameters())  # the attack touches no parameter gradient

    a, lam, n = cfg.attack, cfg.apdpe.diversity_weight, len(method.tasks)
    x = list(batch.views.chunk(n))
    noise = StepRandom("cpu", 4)
    u = [(v + (2 * noise.noise(v.shape, v.dtype) - 1) * a.eps).clamp(0, 1) for v in x]
    objectives = []
    for _ in range(a.steps):
        u = [v.detach().requires_grad_(True) for v in u]
        losses, grads = reference_task_losses(reference_model, u, batch.labels, create_graph=n > 1)
        objective = sum(losses) + (lam * logdet_reference(grads) if n > 1 else 0)
        objectives.append(objective.detach())
        steps = torch.autograd.grad(objective, u)
        u = [torch.min(torch.max(v.detach() + a.step_size * g.sign(), x0 - a.eps), x0 + a.eps).clamp(0, 1)
             for v, g, x0 in zip(u, steps, x)]
    assert torch.allclose(ours.x_adv, torch.cat(u), atol=1e-12)
    # pgd reports its losses in float32: J at the start and at the input of the last step
    assert torch.allclose(ours.initial_loss.double().sum(), objectives[0], rtol=1e-6)
    assert torch.allclose(ours.last_loss.double().sum(), objectives[1], rtol=1e-6)
    assert (ours.x_adv - batch.views).abs().max() <= a.eps + 1e-12


@pytest.mark.parametrize("tasks", ["[rotation,jigsaw]", "[rotation]"])
def test_step_loss_and_parameter_gradients_equal_the_float64_reference(tasks):
    cfg, method, model = method_and_model(f"apdpe.tasks={tasks}", "attack.steps=1")
    reference_model = copy.deepcopy(model)
    batch = double_batch(method)
    out = method.step_loss(model, model, batch, StepRandom("cpu", 6))
    out.loss.backward()

    n, lam = len(method.tasks), cfg.apdpe.diversity_weight
    x_adv = method.attack(copy.deepcopy(reference_model), batch, StepRandom("cpu", 6)).x_adv
    clean, _ = reference_task_losses(reference_model, list(batch.views.chunk(n)), batch.labels)
    adv_views = [v.clone().requires_grad_(True) for v in x_adv.chunk(n)]
    adv, grads = reference_task_losses(reference_model, adv_views, batch.labels, create_graph=n > 1)
    ce_mean = (sum(clean) + sum(adv)) / (2 * n)
    reference = ce_mean + (lam * logdet_reference(grads) if n > 1 else 0)
    assert torch.allclose(out.loss, reference, rtol=1e-10)
    params = list(reference_model.parameters())
    expected = torch.autograd.grad(reference, params, retain_graph=True)
    for (name, p), g in zip(model.named_parameters(), expected):
        assert torch.allclose(p.grad, g, rtol=1e-6, atol=1e-10), name
    if n > 1:  # the penalty's double-backward path reaches the parameters (a create_graph=False would drop it)
        assert "diversity" in out.metrics
        without = torch.autograd.grad(ce_mean, params)
        assert any(not torch.allclose(p.grad, g, rtol=1e-6, atol=1e-10) for p, g in zip(model.parameters(), without))
    else:
        assert "diversity" not in out.metrics


@pytest.mark.parametrize("name", ["apdpe", "apdpe_rotation", "apdpe_jigsaw"])
def test_each_variant_trains_a_step_with_a_gradient_for_every_parameter(name):
    cfg = load_config(None, ["data.name=digits", "model.width=4", "attack.steps=1"])
    cfg = with_overrides(cfg, method_values(name))
    method = build_method(cfg, 100, torch.device("cpu"))
    model = method.build_model()
    sizes = {"rotation": 4, "jigsaw": 31}
    assert [head.out_features for head in model.pseudo_heads] == [sizes[t] for t in cfg.apdpe.tasks]
    assert model.projector is None
    ctx = StepContext.of_batch(model, images(), torch.arange(B), StepRandom("cpu", 0))
    out = method.training_step(ctx)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(not v.requires_grad for v in out.metrics.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())  # DDP needs all
    assert {f"{t}_adv_accuracy" for t in cfg.apdpe.tasks} <= set(out.metrics)


def test_variants_and_default_tasks():
    assert VARIANTS["apdpe_rotation"] == {"train.method": "apdpe", "apdpe.tasks": ["rotation"]}
    assert VARIANTS["apdpe_jigsaw"] == {"train.method": "apdpe", "apdpe.tasks": ["jigsaw"]}
    cfg = load_config(None, ["train.method=apdpe"])
    assert cfg.apdpe.tasks == ["rotation", "jigsaw"] and cfg.apdpe.diversity_weight == 0.1
    identity = build_method(cfg).loop_settings().identity  # changing what the heads mean refuses a resume
    assert {"apdpe.tasks", "apdpe.jigsaw_grid", "apdpe.jigsaw_permutations", "apdpe.permutation_seed"} <= set(identity)


def test_views_of_a_rank_are_its_rows_of_the_single_process_views():
    _, method, _ = method_and_model()
    whole = method.pretext_batch(images(), StepRandom("cpu", 2))
    for rank in range(2):
        part = method.pretext_batch(images()[rank::2], StepRandom("cpu", 2, rank, 2))
        for t in range(2):
            assert torch.equal(part.labels[t], whole.labels[t][rank::2])
            assert torch.equal(part.views[t * B // 2:(t + 1) * B // 2], whole.views[t * B:(t + 1) * B][rank::2])


@pytest.mark.parametrize("override, key", [
    ("apdpe.tasks=[rotation,selfie]", "apdpe.tasks"),
    ("apdpe.tasks=[]", "apdpe.tasks"),
    ("apdpe.tasks=[jigsaw,jigsaw]", "apdpe.tasks"),
    ("apdpe.diversity_weight=-1", "apdpe.diversity_weight"),
    ("apdpe.jigsaw_grid=1", "apdpe.jigsaw_grid"),
    ("apdpe.jigsaw_permutations=0", "apdpe.jigsaw_permutations"),
    ("apdpe.jigsaw_identity_p=1.5", "apdpe.jigsaw_identity_p"),
])
def test_bad_settings_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, ["train.method=apdpe", override])


def test_a_grid_that_does_not_divide_the_views_is_a_config_error():
    cfg = load_config(None, ["train.method=apdpe", "views.size=30"])
    with pytest.raises(ConfigError, match="apdpe.jigsaw_grid"):
        build_method(cfg)
    build_method(with_overrides(cfg, {"apdpe.tasks": ["rotation"]}))  # rotation alone does not cut patches


def test_sync_bn_with_the_diversity_penalty_is_a_config_error():
    """The penalty's double backward does not pass through the cross-rank BN statistics' gather."""
    with pytest.raises(ConfigError, match="train.sync_bn"):
        build_method(load_config(None, ["train.method=apdpe", "train.sync_bn=true"]))
    build_method(load_config(None, ["train.method=apdpe", "train.sync_bn=true", "apdpe.tasks=[rotation]"]))
    build_method(load_config(None, ["train.method=apdpe", "train.sync_bn=true", "apdpe.diversity_weight=0"]))
