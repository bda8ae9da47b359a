import copy

import pytest
import torch
import torchvision

from advcl_dist.models import BRANCHES, BranchBatchNorm, Classifier, build_model, views_plan
from advcl_dist.models.resnet import resnet50
from advcl_dist.models.sync_bn import GlobalBatchNorm, convert_sync_batchnorm

BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def small_model(**kw):
    torch.manual_seed(0)
    return build_model("resnet18", width=8, pseudo_ks=(2, 5), **kw).double()


def test_shapes_and_normalised_projection():
    out = small_model()(torch.rand(6, 3, 32, 32, dtype=torch.float64))
    assert out["features"].shape == (6, 64)
    assert out["proj"].shape == (6, 128)
    assert torch.allclose(out["proj"].norm(dim=1), torch.ones(6, dtype=torch.float64))
    assert [t.shape for t in out["pseudo_logits"]] == [(6, 2), (6, 5)]


def test_resnet18_has_the_standard_size():
    encoder = build_model("resnet18").encoder
    assert encoder.feat_dim == 512
    # ResNet-18 CIFAR encoder: 11.17M parameters with one BN; two extra BN branches add 2 × 9.6k.
    bn = sum(p.numel() for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert sum(p.numel() for p in encoder.parameters()) - 2 * bn // 3 == 11_168_832


def test_resnet50_branch_bn_runs_imagenet_size():
    model = build_model("resnet50", proj_dim=32)
    out = model(torch.rand(4, 3, 64, 64), (("pgd", 2), ("normal", 2)))
    assert out["features"].shape == (4, 2048)


def test_one_forward_equals_separate_forwards():
    """Views with their own branch and batch statistics in one pass == one forward per view."""
    fused, separate = small_model(), small_model()
    separate.load_state_dict(fused.state_dict())
    b = 4
    views = [torch.rand(b, 3, 32, 32, dtype=torch.float64) for _ in range(5)]
    branches = ["pgd", "normal", "normal", "normal", "pgd_ce"]
    weights = torch.randn(5, b, 128, dtype=torch.float64)

    out = fused(torch.cat(views), views_plan(branches, b))
    loss_fused = (out["proj"] * weights.reshape(5 * b, 128)).sum() + sum(t.sum() for t in out["pseudo_logits"])
    loss_fused.backward()

    loss_sep, projs = 0, []
    for view, branch, w in zip(views, branches, weights):
        o = separate(view, ((branch, b),))
        projs.append(o["proj"])
        loss_sep = loss_sep + (o["proj"] * w).sum() + sum(t.sum() for t in o["pseudo_logits"])
    loss_sep.backward()

    assert torch.allclose(out["proj"], torch.cat(projs), atol=1e-10)
    for (name, p_f), (_, p_s) in zip(fused.named_parameters(), separate.named_parameters()):
        assert (p_f.grad is None) == (p_s.grad is None), name
        if p_f.grad is not None:
            assert torch.allclose(p_f.grad, p_s.grad, atol=1e-9), name
    for (name, b_f), (_, b_s) in zip(fused.named_buffers(), separate.named_buffers()):
        assert torch.equal(b_f, b_s) if b_f.dtype == torch.long else torch.allclose(b_f, b_s, atol=1e-12), name


def test_branches_have_their_own_statistics():
    model = small_model()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    model(x, (("pgd", 4),))
    bn = model.encoder.bn1
    assert bn.bns["pgd"].num_batches_tracked.item() == 1
    assert bn.bns["normal"].num_batches_tracked.item() == 0
    model.eval()
    a = model(x, (("pgd", 4),))["features"]
    b = model(x, (("normal", 4),))["features"]
    assert not torch.allclose(a, b)


def test_plan_must_cover_the_batch_and_name_known_branches():
    bn = BranchBatchNorm(3)
    with pytest.raises(ValueError, match="covers 5 rows"):
        bn(torch.rand(4, 3, 2, 2), (("normal", 2), ("pgd", 3)))
    with pytest.raises(KeyError, match="bogus"):
        bn(torch.rand(4, 3, 2, 2), (("normal", 2), ("bogus", 2)))


def test_plan_is_an_argument_not_module_state():
    model = small_model()
    model(torch.rand(4, 3, 32, 32, dtype=torch.float64), (("pgd", 2), ("normal", 2)))
    assert not any(hasattr(m, "plan") for m in model.modules())
    copy.deepcopy(model)


def test_a_forward_nested_inside_another_does_not_see_or_change_its_plan():
    """A BN hook that runs another forward with another plan: both results equal their forwards alone."""
    model, reference = small_model(), small_model()
    x, y = torch.rand(4, 3, 32, 32, dtype=torch.float64), torch.rand(3, 3, 32, 32, dtype=torch.float64)
    outer_plan, inner_plan = (("pgd", 2), ("normal", 2)), (("pgd_ce", 3),)
    expected_outer = reference(x, outer_plan)["proj"]  # train mode: outputs use batch statistics only
    expected_inner = reference(y, inner_plan)["proj"]
    inner, calls = [], []

    def run_inner(*_):
        calls.append(1)
        if len(calls) == 1:  # the nested forward passes this BN too
            inner.append(model(y, inner_plan)["proj"])

    model.encoder.layers[2].bn1.register_forward_hook(run_inner)  # mid-network, before a shortcut BN
    outer = model(x, outer_plan)["proj"]
    assert len(inner) == 1
    torch.testing.assert_close(outer, expected_outer)
    torch.testing.assert_close(inner[0], expected_inner)


def bn_keys(prefix: str, branches) -> list[str]:
    return [f"{prefix}.bns.{b}.{leaf}" for b in branches for leaf in BN_STATE]


def test_resnet18_state_dict_keys_are_unchanged():
    """Checkpoints on disk name these keys: stem, `layers.<i>` blocks, (conv, BN) shortcuts as `shortcut.0/1`."""
    branches = ("normal", "pgd")
    expected = ["conv1.weight", *bn_keys("bn1", branches)]
    for i in range(8):
        block = f"layers.{i}"
        expected += [f"{block}.conv1.weight", *bn_keys(f"{block}.bn1", branches),
                     f"{block}.conv2.weight", *bn_keys(f"{block}.bn2", branches)]
        if i in (2, 4, 6):  # first block of stages 2-4: stride 2, more channels
            expected += [f"{block}.shortcut.0.weight", *bn_keys(f"{block}.shortcut.1", branches)]
    encoder = build_model("resnet18", width=8, branches=branches).encoder
    assert list(encoder.state_dict()) == expected
    assert encoder.state_dict()["layers.2.shortcut.0.weight"].shape == (16, 8, 1, 1)


def torchvision_keys_with_branches(branches) -> list[str]:
    """torchvision's ResNet-50 keys (no fc) with each BatchNorm's entries under `bns.<branch>`."""
    net = torchvision.models.resnet50(weights=None)
    norms = {name for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    keys = []
    for key in net.state_dict():
        module, leaf = key.rsplit(".", 1)
        if module not in norms:
            keys += [] if module == "fc" else [key]
        elif leaf == "weight":  # a BN's five entries become five per branch, branch after branch
            keys += bn_keys(module, branches)
    return keys


def test_resnet50_state_dict_keys_are_torchvisions_with_branch_bn():
    for branches in (BRANCHES, ("normal",)):
        encoder = resnet50(branches)
        assert list(encoder.state_dict()) == torchvision_keys_with_branches(branches)
        assert encoder.feat_dim == 2048
    keys = resnet50().state_dict()
    assert "bn1.bns.pgd.weight" in keys and "layer1.0.downsample.1.bns.pgd_ce.running_var" in keys


@torch.no_grad()
def test_resnet50_forward_equals_torchvisions_on_its_weights():
    """The hand-written walk of the blocks computes what torchvision's forward does (eval and train BN)."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None)
    reference.fc = torch.nn.Identity()
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
    state = reference.state_dict()
    norms = {key.rsplit(".", 1)[0] for key in state if key.endswith(".running_mean")}
    ours = resnet50(("normal",))
    ours.load_state_dict({(f"{m}.bns.normal.{leaf}" if m in norms else key): value
                          for key, value in state.items() for m, leaf in [key.rsplit(".", 1)]})
    x = torch.rand(2, 3, 64, 64)
    for train in (False, True):
        torch.testing.assert_close(ours.train(train)(x, (("pgd", 2),)), reference.train(train)(x))


def test_classifier_gives_each_view_its_own_statistics_on_its_branch():
    torch.manual_seed(0)
    encoder = build_model("resnet18", width=8).encoder.double()
    model = Classifier(encoder, 10, branch="pgd")
    a, b = torch.rand(3, 3, 32, 32, dtype=torch.float64), torch.rand(3, 3, 32, 32, dtype=torch.float64)
    both = model.features(torch.cat([a, b]), views=2)
    torch.testing.assert_close(both, torch.cat([encoder(a, (("pgd", 3),)), encoder(b, (("pgd", 3),))]))
    assert encoder.bn1.bns["pgd"].num_batches_tracked.item() == 4
    assert encoder.bn1.bns["normal"].num_batches_tracked.item() == 0


def test_global_batch_norm_sits_inside_the_branches_and_takes_the_plan():
    """convert_sync_batchnorm swaps the BNs inside each BranchBatchNorm; alone it computes plain BN."""
    fused, plain = small_model().float(), small_model().float()  # the conversion builds float32 BNs
    fused = convert_sync_batchnorm(fused, torch.device("cpu"))
    assert isinstance(fused.encoder.layers[2].shortcut[1].bns["pgd"], GlobalBatchNorm)
    assert isinstance(fused.projector.bn.bns["shared"], GlobalBatchNorm)
    x, plan = torch.rand(4, 3, 32, 32), (("pgd", 2), ("normal", 2))
    torch.testing.assert_close(fused(x, plan)["proj"], plain(x, plan)["proj"])
    for name, buffer in plain.named_buffers():  # each segment updated its own branch's statistics
        torch.testing.assert_close(fused.get_buffer(name), buffer)


def test_unknown_arch_names_the_key():
    with pytest.raises(ValueError, match="model.arch"):
        build_model("vgg")


# ---- model.init: the authors' kaiming fan_out initialisation, or PyTorch's ------------------------------------

def conv_stats(encoder):
    """(weight std, formula std of kaiming fan_out, formula std of PyTorch's default, max |w|, bound of PyTorch's
    default) for every conv: fan_out = out·kh·kw, N(0, 2/fan_out); PyTorch's U(±1/√fan_in) has std 1/√(3·fan_in)."""
    rows = []
    for m in encoder.modules():
        if isinstance(m, torch.nn.Conv2d):
            out_ch, in_ch, kh, kw = m.weight.shape
            fan_out, fan_in = out_ch * kh * kw, in_ch * kh * kw
            w = m.weight.detach().double()
            rows.append((w.std().item(), (2 / fan_out) ** 0.5, (1 / (3 * fan_in)) ** 0.5, w.abs().max().item(),
                         fan_in ** -0.5, w.numel()))
    return rows


def test_default_init_is_kaiming_normal_fan_out_with_unit_batch_norm():
    from advcl_dist.models import BACKBONES

    torch.manual_seed(0)
    encoder = BACKBONES["resnet18"](64, BRANCHES)
    for std, kaiming, default, *_, n in conv_stats(encoder):
        assert std == pytest.approx(kaiming, rel=0.1 if n < 10_000 else 0.02)
        assert abs(std - default) > 0.3 * default  # ratios: √6 (3×3, in = out), √3 (1×1 shortcut), 0.53 (stem)
    widest = max(conv_stats(encoder), key=lambda row: row[-1])
    assert widest[-1] == 512 * 512 * 9 and widest[3] > widest[4]  # a normal draw exceeds the uniform's bound
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_torch_init_is_pytorchs_default_uniform():
    from advcl_dist.models import BACKBONES

    torch.manual_seed(0)
    encoder = BACKBONES["resnet18"](64, ("normal",), init="torch")
    for std, kaiming, default, biggest, bound, n in conv_stats(encoder):
        assert std == pytest.approx(default, rel=0.1 if n < 10_000 else 0.02)
        assert biggest <= bound and abs(std - kaiming) > 0.3 * kaiming


def test_resnet50_keeps_torchvisions_init_which_is_the_same_rule():
    torch.manual_seed(0)
    encoder = resnet50(("normal", "pgd"))
    big = [row for row in conv_stats(encoder) if row[-1] >= 500_000]
    assert len(big) >= 10
    for std, kaiming, *_ in big:
        assert std == pytest.approx(kaiming, rel=0.02)
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)


def test_unknown_init_is_refused_naming_the_key():
    from advcl_dist.config import ConfigError, load_config
    from advcl_dist.models.resnet import CifarResNet

    with pytest.raises(ConfigError, match=r"config key 'model.init': 'xavier' is not one of \['kaiming_fan_out', "
                                          r"'torch'\]"):
        load_config(None, ["model.init=xavier"])
    with pytest.raises(ValueError, match="model.init='xavier'"):
        CifarResNet(width=4, init="xavier")
    assert load_config(None, []).model.init == "kaiming_fan_out"
