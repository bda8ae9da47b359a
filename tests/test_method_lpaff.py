"""LP-AFF, DynACL++'s post-processing (methods/lpaff.py): the two phases of the authors' LPAFT_AFF.py against
references written here, its schedule, its refusals, and its checkpoint as finetuning reads it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advcl_dist.config import ConfigError, load_config, to_yaml
from advcl_dist.data.augment import crop_flip_view
from advcl_dist.distributed import distributed_session
from advcl_dist.engine.checkpoint import load_checkpoint, load_encoder, save_checkpoint
from advcl_dist.engine.objective import StepContext
from advcl_dist.engine.trainer import Trainer
from advcl_dist.methods import build_method
from advcl_dist.methods.lpaff import trades_objective
from advcl_dist.rng import StepRandom

B = 8
N = 1437  # digits
TINY = ["data.name=digits", "data.workers=0", "train.device=cpu", "model.width=4", "model.proj_dim=16"]


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A DynACL checkpoint as the trainer writes it (weights + facts + config; BN statistics from a few
    train-mode forwards), and pseudo-labels for digits (K = 10, one image left unlabelled: -1)."""
    root = tmp_path_factory.mktemp("init")
    cfg = load_config(None, [*TINY, "train.method=dynacl"])
    torch.manual_seed(0)
    model = build_method(cfg).build_model()
    with torch.no_grad():
        for branch in ("normal", "pgd", "pgd"):
            model(torch.rand(16, 3, 32, 32), ((branch, 16),))
    save_checkpoint({"model": model.state_dict(), "config": to_yaml(cfg), "method": "dynacl", "step": 1,
                     "finished": True}, root / "checkpoint.pt")
    labels = np.random.default_rng(0).integers(0, 10, size=(N, 1)).astype(np.int64)
    labels[3] = -1
    np.save(root / "pl.npy", labels)
    return root


def lpaff_config(init, *extra):
    return load_config(None, [*TINY, "train.method=lpaff", f"lpaff.init={init / 'checkpoint.pt'}",
                              f"pseudo.labels={init / 'pl.npy'}", "pseudo.ks=[10]", "lpaff.head_epochs=2",
                              "lpaff.epochs=3", "attack.supervised_steps=1", *extra])


def lpaff_and_model(init, *extra):
    method = build_method(lpaff_config(init, *extra), N, torch.device("cpu"), num_classes=10)
    return method, method.build_model()


def encoder_state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.encoder.state_dict().items()}


def engine_step(method, model, steps_per_epoch: int):
    """One optimisation step as engine/backends.py's TorchEngine runs it (SGD, the method's groups and lr factor)."""
    loop = method.loop_settings()
    optimizer = torch.optim.SGD(method.param_groups(model), lr=loop.lr, momentum=loop.momentum,
                                weight_decay=loop.weight_decay)
    total = loop.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: method.lr_factor(s, steps_per_epoch, total))

    def step(ctx):
        out = method.training_step(ctx)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        return out

    return step, optimizer


def context(model, step: int, epoch: int) -> StepContext:
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(step))
    ctx = StepContext.of_batch(model, images, torch.arange(B) + 1, StepRandom("cpu", step), step=step)
    ctx.epoch = epoch
    return ctx


def test_probing_leaves_the_encoder_bit_equal_then_finetuning_moves_the_served_branch(init):
    method, model = lpaff_and_model(init)
    start = encoder_state(model)
    step, optimizer = engine_step(method, model, steps_per_epoch=1)
    for s in range(2):  # head_epochs = 2: linear probing
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # the lr of this step: --lr_head
        step(context(model, s, epoch=s))
    after = encoder_state(model)
    assert all(torch.equal(start[k], after[k]) for k in start)  # weights and BN statistics alike
    assert model.pseudo_heads[0].weight.abs().sum() > 0  # the zero-initialised head learnt
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    out = step(context(model, 2, epoch=2))  # TRADES
    assert set(out.metrics) == {"loss", "adv_accuracy"}
    after = encoder_state(model)
    assert not torch.equal(start["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(start["bn1.bns.pgd.running_mean"], after["bn1.bns.pgd.running_mean"])
    normal = [k for k in start if ".bns.normal." in k]
    assert normal and all(torch.equal(start[k], after[k]) for k in normal)  # the other branch is kept


def test_learning_rates_are_the_authors():
    """LPAFT_AFF.py: the head at --lr_head 0.01, constant, for --epochs_head 10; then --lr 0.1 with
    MultiStepLR([10, 20], 0.1) over the --epochs 25 of TRADES."""
    from advcl_dist.methods.lpaff import LPAFF

    method = LPAFF(load_config(None, ["train.method=lpaff"]))
    s = method.settings
    assert (s.head_epochs, s.epochs, s.batch_size, s.trades_beta) == (10, 25, 512, 6.0)
    assert method.loop_settings().epochs == 35 and method.loop_settings().lr == 0.1
    spe = 3
    lr = {epoch: s.lr * method.lr_factor(epoch * spe + 1, spe, 35 * spe) for epoch in range(35)}
    assert all(lr[e] == pytest.approx(0.01) for e in range(10))
    assert all(lr[e] == pytest.approx(0.1) for e in range(10, 20))
    assert all(lr[e] == pytest.approx(0.01) for e in range(20, 30))
    assert all(lr[e] == pytest.approx(0.001) for e in range(30, 35))


def test_probing_loss_is_the_cross_entropy_of_the_frozen_features(init):
    method, model = lpaff_and_model(init)
    torch.nn.init.normal_(model.pseudo_heads[0].weight)  # not the zero start, so the reference is not ln K
    ctx = context(model, 0, epoch=0)
    out = method.training_step(ctx)
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.pseudo_heads[0].weight.grad is not None
    x = crop_flip_view(ctx.images, StepRandom("cpu", 0), size=32, padding=4)
    with torch.no_grad():
        logits = model.eval()(x, (("pgd", B),))["pseudo_logits"][0].double()
    y = torch.as_tensor(np.load(method.cfg.pseudo.labels)[1:B + 1, 0])
    picked = [torch.log_softmax(logits[i], 0)[y[i]] for i in range(B) if y[i] >= 0]
    reference = -sum(picked) / len(picked)
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_trades_objective_and_its_gradients_match_the_equation():
    """Zhang et al. 2019 eq. (5) as utils.trades_loss computes it: CE(clean, y) + β · (1/B) Σ_i KL(p_clean ‖ p_adv),
    with the unlabelled rows (-1) left out of the CE only."""
    torch.manual_seed(0)
    clean = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, -1, 2, 1, 1])
    ours = trades_objective(clean, adv, y, 6.0)
    grads = torch.autograd.grad(ours, [clean, adv])
    c, a = clean.detach().clone().requires_grad_(True), adv.detach().clone().requires_grad_(True)
    ce = [-(c[i, y[i]] - torch.logsumexp(c[i], 0)) for i in range(6) if y[i] >= 0]
    kl = 0
    for i in range(6):
        p, log_p, log_q = torch.softmax(c[i], 0), torch.log_softmax(c[i], 0), torch.log_softmax(a[i], 0)
        kl = kl + (p * (log_p - log_q)).sum()
    reference = sum(ce) / len(ce) + 6.0 * kl / 6
    ref_grads = torch.autograd.grad(reference, [c, a])
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    assert all(torch.allclose(g, r, atol=1e-12) for g, r in zip(grads, ref_grads))


def test_checkpoint_is_a_pretraining_checkpoint_that_finetuning_loads(init, tmp_path):
    cfg = lpaff_config(init, f"out_dir={tmp_path}", "lpaff.batch_size=256", "lpaff.head_epochs=1",
                       "lpaff.epochs=1")
    with distributed_session("cpu") as info:
        Trainer(cfg, info).fit(stop_after_steps=1)  # one probing step through the real engine
    encoder, facts = load_encoder(tmp_path / "checkpoint.pt")
    assert facts["method"] == "lpaff" and facts["branches"] == ["normal", "pgd"] and facts["width"] == 4
    start, _ = load_encoder(init / "checkpoint.pt")
    ours, theirs = encoder.state_dict(), start.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["lpaff"]["init"] == str((init / "checkpoint.pt").resolve()) and state["lpaff"]["k"] == 10
    assert state["model"]["pseudo_heads.0.weight"].abs().sum() > 0


def test_refuses_a_missing_init_or_labels(init, tmp_path):
    no_init = load_config(None, [*TINY, "train.method=lpaff", f"pseudo.labels={init / 'pl.npy'}",
                                 "pseudo.ks=[10]"])
    with pytest.raises(ConfigError, match="lpaff.init is not set"):
        build_method(no_init, N)
    with pytest.raises(ConfigError, match="does not exist"):
        build_method(lpaff_config(init, f"lpaff.init={tmp_path / 'none.pt'}"), N)
    with pytest.raises(ConfigError, match="pseudo.labels"):
        build_method(lpaff_config(init, "pseudo.labels=null"), N)
    with pytest.raises(ConfigError, match="model.width=4"):
        build_method(lpaff_config(init, "model.width=8"), N).build_model()
    with pytest.raises(ConfigError, match="finetune.bn_branch"):
        build_method(lpaff_config(init, "finetune.bn_branch=pgd_ce"), N).build_model()


def test_unlabelled_rows_do_not_count():
    logits = torch.zeros(3, 4)
    logits[0, 1] = 5.0
    y = torch.tensor([1, -1, -1])
    assert trades_objective(logits, logits, y, 6.0).item() == pytest.approx(F.cross_entropy(logits[:1], y[:1]).item())
