import math

import pytest
import torch

from advcl_dist.losses import multiview_nt_xent, pseudo_label_ce, trades_kl


def reference_nt_xent(z, temperature):
    """The contract written out as a float64 loop over anchors."""
    z = torch.nn.functional.normalize(z.double(), dim=-1)
    b, v, _ = z.shape
    emb = [(i, a, z[i, a]) for i in range(b) for a in range(v)]
    total = 0.0
    for i, a, anchor in emb:
        others = [(j, c, e) for j, c, e in emb if (j, c) != (i, a)]
        denom = sum(math.exp(float(anchor @ e) / temperature) for _, _, e in others)
        pos = [float(anchor @ e) / temperature - math.log(denom) for j, _, e in others if j == i]
        total += -sum(pos) / (v - 1)
    return total / (b * v)


@pytest.mark.parametrize("b,v,t", [(4, 2, 0.5), (3, 4, 0.5), (5, 3, 0.1)])
def test_multiview_nt_xent_matches_float64_loop(b, v, t):
    torch.manual_seed(b * v)
    z = torch.randn(b, v, 8, dtype=torch.float64)
    got = multiview_nt_xent(z, temperature=t)
    assert got.item() == pytest.approx(reference_nt_xent(z, t), rel=1e-5)


def test_multiview_nt_xent_normalises_and_prefers_aligned_views():
    torch.manual_seed(0)
    base = torch.randn(8, 1, 16)
    aligned = base.repeat(1, 4, 1) * torch.rand(8, 4, 1) * 5  # same direction, other norms
    random = torch.randn(8, 4, 16)
    assert multiview_nt_xent(aligned) < multiview_nt_xent(random)
    assert multiview_nt_xent(aligned).item() == pytest.approx(multiview_nt_xent(base.repeat(1, 4, 1)).item(), rel=1e-5)


def test_multiview_nt_xent_bf16_input_reduces_in_float32():
    z = torch.randn(6, 2, 8)
    got = multiview_nt_xent(z.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_nt_xent(z.bfloat16().float(), 0.5), rel=1e-4)


def test_multiview_nt_xent_rejects_single_view():
    with pytest.raises(ValueError, match="V>=2"):
        multiview_nt_xent(torch.randn(4, 1, 8))


def test_pseudo_label_ce_is_mean_over_heads_with_ignore_index():
    torch.manual_seed(0)
    logits = [torch.randn(6, 2), torch.randn(6, 10)]
    labels = torch.tensor([[0, 3], [1, -1], [1, 9], [-1, 2], [0, 0], [1, -1]])
    expected = 0.0
    for k, lg in enumerate(logits):
        terms = [-torch.log_softmax(lg[i].double(), 0)[labels[i, k]] for i in range(6) if labels[i, k] != -1]
        expected += float(sum(terms) / len(terms))
    assert pseudo_label_ce(logits, labels).item() == pytest.approx(expected / 2, rel=1e-6)


def test_pseudo_label_ce_all_ignored_head_contributes_zero():
    logits = [torch.randn(3, 2), torch.randn(3, 4)]
    labels = torch.tensor([[-1, 1], [-1, 2], [-1, 3]])
    single = pseudo_label_ce(logits[1:], labels[:, 1:])
    assert torch.isfinite(pseudo_label_ce(logits, labels))
    assert pseudo_label_ce(logits, labels).item() == pytest.approx(single.item() / 2, rel=1e-6)


def test_trades_kl_is_the_batch_mean_of_kl_clean_to_adversarial():
    torch.manual_seed(0)
    adv, clean = torch.randn(5, 7), torch.randn(5, 7)
    expected = 0.0
    for a_row, c_row in zip(adv.double().tolist(), clean.double().tolist()):
        za, zc = sum(math.exp(v) for v in a_row), sum(math.exp(v) for v in c_row)
        expected += sum(math.exp(c) / zc * ((c - math.log(zc)) - (a - math.log(za))) for a, c in zip(a_row, c_row))
    assert trades_kl(adv.double(), clean.double()).item() == pytest.approx(expected / 5, rel=1e-12)
    assert trades_kl(clean, clean).item() == pytest.approx(0.0, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert trades_kl(adv.bfloat16(), clean.bfloat16()).dtype == torch.float32
