"""DeACL (Zhang et al., ECCV 2022) against float64 references written from the authors' code.

pantheon5100/DeACL solo/methods/mocov2_distillation_AT.py: the target is the frozen teacher's features of the
weak view x; the attack ascends −cos(f_S(x'), t) with the student in eval mode; the loss is
−cos(f_S(x), t) − λ·cos(f_S(x'), f_S(x)) from one train-mode forward of [x; x']. The teacher is a tiny SimCLR
checkpoint made here by the trainer.
"""
import copy

import pytest
import torch

import advcl_dist.data.augment as augment
from advcl_dist.config import ConfigError, load_config
from advcl_dist.data.augment import crop_flip_view
from advcl_dist.distributed import distributed_session
from advcl_dist.engine import CHECKPOINT, Trainer
from advcl_dist.engine.checkpoint import load_checkpoint
from advcl_dist.engine.objective import StepContext
from advcl_dist.methods import build_method
from advcl_dist.methods.deacl import away_from_target, deacl_loss
from advcl_dist.rng import StepRandom

B = 8


def tiny(out_dir, *extra):
    return [f"out_dir={out_dir}", "data.name=digits", "data.workers=0", "train.device=cpu", "model.width=4",
            "model.proj_dim=16", "train.batch_size=8", "train.epochs=1", "optim.warmup_epochs=0", "attack.steps=2",
            "train.log_every=1", *extra]


def fit(overrides, steps=1):
    with distributed_session("cpu") as info:
        return Trainer(load_config(None, overrides), info).fit(stop_after_steps=steps)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A SimCLR checkpoint.pt (width 4) written by the trainer after one step."""
    run = fit(tiny(tmp_path_factory.mktemp("teacher"), "train.method=simclr"))
    return run / CHECKPOINT


def deacl(teacher, *overrides):
    cfg = load_config(None, ["data.name=digits", "model.width=4", "attack.steps=2", "train.method=deacl",
                             f"deacl.teacher={teacher}", *overrides])
    return cfg, build_method(cfg, 100, torch.device("cpu"))


def cos(a, b):
    """Row-wise cosine similarity, written out."""
    return (a * b).sum(1) / (a.pow(2).sum(1).sqrt() * b.pow(2).sum(1).sqrt())


def test_loss_and_attack_objective_and_their_gradients_match_the_formulas():
    f_clean = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    f_adv = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 10, dtype=torch.float64)
    loss, distill, robust = deacl_loss(f_clean, f_adv, target, 2.0)
    grads = torch.autograd.grad(loss, (f_clean, f_adv))
    reference = -cos(f_clean, target).mean() - 2.0 * cos(f_adv, f_clean).mean()
    ref_grads = torch.autograd.grad(reference, (f_clean, f_adv))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    assert distill.item() == pytest.approx(-cos(f_clean, target).mean().item(), rel=1e-12)
    assert robust.item() == pytest.approx(-cos(f_adv, f_clean).mean().item(), rel=1e-12)
    for ours, ref in zip(grads, ref_grads):
        assert torch.allclose(ours, ref, atol=1e-12)
    # f_clean's gradient has both terms' parts: nothing but the teacher is detached
    (distill_only,) = torch.autograd.grad(-cos(f_clean, target).mean(), f_clean)
    assert not torch.allclose(grads[0], distill_only, atol=1e-4)
    objective = away_from_target(f_adv, target)
    assert objective.item() == pytest.approx(-cos(f_adv, target).mean().item(), rel=1e-12)


def test_missing_teacher_is_a_config_error_naming_the_key_and_how_to_make_one(tmp_path):
    cfg = load_config(None, ["data.name=digits", "train.method=deacl"])
    with pytest.raises(ConfigError, match=r"deacl\.teacher is null.*tools/pretrain\.py train\.method=simclr"):
        build_method(cfg, 100, torch.device("cpu"))
    cfg = load_config(None, ["data.name=digits", "train.method=deacl", f"deacl.teacher={tmp_path / 'none.pt'}"])
    with pytest.raises(ConfigError, match=r"deacl\.teacher=.*none\.pt is not a file"):
        build_method(cfg, 100, torch.device("cpu"))


def test_teacher_of_another_feature_width_or_architecture_is_refused(teacher):
    _, method = deacl(teacher, "model.width=8")
    with pytest.raises(ConfigError, match=r"its features are 32-d .* the student's are 64-d"):
        method.build_model()
    _, method = deacl(teacher, "model.arch=resnet34")  # the same 32-d features: only the weight copy fails
    with pytest.raises(ConfigError, match=r"deacl\.init_from_teacher=true"):
        method.build_model()
    _, method = deacl(teacher, "model.arch=resnet34", "deacl.init_from_teacher=false")
    assert method.build_model().feat_dim == 32


def test_student_starts_from_the_teacher_and_the_teacher_stays_outside_the_model(teacher):
    _, method = deacl(teacher)
    model = method.build_model()
    assert model.projector is None and len(model.pseudo_heads) == 0  # encoder only, like the teacher target
    assert all(torch.equal(p, q) for p, q in zip(model.encoder.state_dict().values(),
                                                  method.teacher.state_dict().values()))
    teacher_ids = {id(p) for p in method.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert all(not p.requires_grad for p in method.teacher.parameters()) and not method.teacher.training
    _, scratch = deacl(teacher, "deacl.init_from_teacher=false")
    torch.manual_seed(1)
    assert not torch.equal(scratch.build_model().encoder.conv1.weight, method.teacher.conv1.weight)


def reference_attack(student, x, target, cfg, generator: StepRandom):
    """generate_training_AE: eval mode, ascend −cos(f_S(x'), t), project onto the ε-ball and [0, 1]."""
    a, plan = cfg.attack, (("normal", x.shape[0]),)
    student.eval()
    x_adv = (x + (2 * generator.noise(x.shape, x.dtype) - 1) * a.eps).clamp(0, 1)
    for _ in range(a.steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(-cos(student(x_adv, plan)["features"], target).sum(), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + a.step_size * grad.sign(), x - a.eps), x + a.eps).clamp(0, 1)
    student.train()
    return x_adv


def test_training_step_equals_the_authors_loss_and_no_gradient_reaches_the_teacher(teacher, monkeypatch):
    """Float64 throughout (views, student, teacher): loss and every student gradient against the reference."""
    monkeypatch.setattr(augment, "to_float", lambda images: images.to(torch.float64) / 255.0)
    cfg, method = deacl(teacher)
    method.teacher.double()
    model = method.build_model().double()
    frozen = copy.deepcopy(method.teacher.state_dict())
    tracked = model.encoder.bn1.bns["normal"].num_batches_tracked.item()
    reference_model, reference_teacher = copy.deepcopy(model), copy.deepcopy(method.teacher)
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    out = method.training_step(StepContext.of_batch(model, images, torch.arange(B), StepRandom("cpu", 0)))
    out.loss.backward()

    generator = StepRandom("cpu", 0)
    x = crop_flip_view(images, generator, size=32, padding=4)
    target = reference_teacher(x, (("normal", B),)).detach()
    x_adv = reference_attack(reference_model, x, target, cfg, generator)
    features = reference_model(torch.cat([x, x_adv]), (("normal", 2 * B),))["features"]
    reference = -cos(features[:B], target).mean() - 2.0 * cos(features[B:], features[:B]).mean()
    reference.backward()

    assert set(out.metrics) == {"loss", "loss_distill", "loss_robust", "attack_gain"}
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-10)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10), name
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in method.teacher.state_dict().items())  # stats too
    assert not method.teacher.training and model.training
    assert model.encoder.bn1.bns["normal"].num_batches_tracked.item() == tracked + 1  # the attack: eval mode


def test_step_under_bf16_autocast_keeps_an_fp32_loss_and_perturbation(teacher):
    _, method = deacl(teacher)
    model = method.build_model()
    seen, attack = {}, method.attack
    method.attack = lambda *args: seen.setdefault("adv", attack(*args))
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(StepContext.of_batch(model, images, torch.arange(B), StepRandom("cpu", 0)))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert seen["adv"].x_adv.dtype == torch.float32
    out.loss.backward()


def test_trainer_optimises_and_saves_the_student_only(teacher, tmp_path):
    run = fit(tiny(tmp_path / "deacl", "train.method=deacl", f"deacl.teacher={teacher}"))
    state = load_checkpoint(run / CHECKPOINT)
    assert all(key.startswith("encoder.") for key in state["model"])
    student_params = sum(1 for key in state["model"] if key.endswith(("weight", "bias")))
    assert sum(len(group["params"]) for group in state["optimizer"]["param_groups"]) == student_params
    assert state["teacher"]["method"] == "simclr" and state["teacher"]["width"] == 4


@pytest.mark.parametrize("preset", ["configs/cifar10_deacl.yaml", "configs/cifar100_deacl.yaml"])
def test_presets_load_with_the_authors_values(preset):
    cfg = load_config(preset, [])
    assert cfg.train.method == "deacl" and cfg.deacl.teacher is None and cfg.deacl.robust_weight == 2.0
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (100, 256, 0.5, 5e-4)
