import copy

import pytest
import torch

from advcl_dist.models import BranchBatchNorm, build_model, views_plan


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
    bn.plan = (("normal", 2),)
    bn.plan = (("normal", 2), ("pgd", 3))
    with pytest.raises(ValueError, match="covers 5 rows"):
        bn(torch.rand(4, 3, 2, 2))
    bn.plan = (("normal", 2), ("bogus", 2))
    with pytest.raises(KeyError, match="bogus"):
        bn(torch.rand(4, 3, 2, 2))


def test_plan_is_cleared_after_forward():
    model = small_model()
    model(torch.rand(4, 3, 32, 32, dtype=torch.float64), (("pgd", 2), ("normal", 2)))
    assert all(m.plan is None for m in model.modules() if isinstance(m, BranchBatchNorm))
    copy.deepcopy(model)  # picklable state, no dangling plan


def test_unknown_arch_names_the_key():
    with pytest.raises(ValueError, match="model.arch"):
        build_model("vgg")
