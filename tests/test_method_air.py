"""SIR / AIR (Xu et al., NeurIPS 2023) against a float64 reference written here from the paper's definitions:
distributions over the batch of exp(sim / t), KL(p ‖ q; B) = Σ_{x∈B} p log(p / q), nothing detached."""
import math

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks

from advcl_dist.methods.air import invariance_regularisers

B, D, T = 6, 5, 0.5


def inputs(seed=0, batch=B, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, D, generator=g, dtype=torch.float64).requires_grad_(requires_grad) for _ in range(5)]


def batch_distribution(a, b, t):
    """p(k) = exp(cos(a_k, b_k) / t) / Σ_j exp(cos(a_j, b_j) / t), one sample at a time."""
    scores = []
    for k in range(a.shape[0]):
        dot = sum(a[k, d] * b[k, d] for d in range(a.shape[1]))
        norm_a = torch.sqrt(sum(a[k, d] ** 2 for d in range(a.shape[1])))
        norm_b = torch.sqrt(sum(b[k, d] ** 2 for d in range(b.shape[1])))
        scores.append(torch.exp(dot / (norm_a * norm_b) / t))
    total = sum(scores)
    return [s / total for s in scores]


def reference(nat1, nat2, adv1, adv2, orig, t, form="paper"):
    """(SIR, AIR): SIR = KL(p1(y|x) ‖ p2(y|x)), AIR = KL(p1(y|x̃) p1(x̃|x) ‖ p2(y|x̃) p2(x̃|x)); `authors_code`:
    AIR.py's kl_div(probabilities, log q, log_target=True) = Σ q (log q − p)."""
    p1, p2 = batch_distribution(orig, nat1, t), batch_distribution(orig, nat2, t)
    q1 = [y * c for y, c in zip(batch_distribution(orig, adv1, t), batch_distribution(adv1, nat1, t))]
    q2 = [y * c for y, c in zip(batch_distribution(orig, adv2, t), batch_distribution(adv2, nat2, t))]
    if form == "paper":
        def kl(p, q):
            return sum(pk * torch.log(pk / qk) for pk, qk in zip(p, q))
    else:
        def kl(p, q):
            return sum(qk * (torch.log(qk) - pk) for pk, qk in zip(p, q))
    return kl(p1, p2), kl(q1, q2)


@pytest.mark.parametrize("form", ["paper", "authors_code"])
def test_values_and_gradients_of_every_input_equal_the_reference(form):
    ours_in, ref_in = inputs(), inputs()
    nat1, nat2, adv1, adv2, orig = ours_in
    sir, air = invariance_regularisers(nat1, nat2, adv1, adv2, T, orig=orig, kl_form=form)
    ref_sir, ref_air = reference(*ref_in, T, form)
    assert torch.allclose(sir, ref_sir, atol=1e-12) and torch.allclose(air, ref_air, atol=1e-12)
    assert sir.item() != pytest.approx(air.item())  # two different terms
    for ours_term, ref_term in ((sir, ref_sir), (air, ref_air)):
        ours_grads = torch.autograd.grad(ours_term, ours_in, retain_graph=True, allow_unused=True)
        ref_grads = torch.autograd.grad(ref_term, ref_in, retain_graph=True, allow_unused=True)
        for name, g, r in zip(("nat1", "nat2", "adv1", "adv2", "orig"), ours_grads, ref_grads):
            if r is None:  # SIR does not involve the adversarial views
                assert g is None or torch.count_nonzero(g) == 0, name
            else:
                assert g is not None and torch.allclose(g, r, atol=1e-12), name
    # nothing is detached: AIR back-propagates into all five inputs, SIR into the natural views and x
    air_grads = torch.autograd.grad(air, ours_in, retain_graph=True)
    assert all(torch.count_nonzero(g) > 0 for g in air_grads)
    sir_grads = torch.autograd.grad(sir, [nat1, nat2, orig])
    assert all(torch.count_nonzero(g) > 0 for g in sir_grads)


def test_kl_direction_and_invariance():
    """KL(view 1 ‖ view 2), not the reverse; both vanish when the two views' distributions coincide."""
    nat1, nat2, adv1, adv2, orig = inputs(requires_grad=False)
    sir, air = invariance_regularisers(nat1, nat2, adv1, adv2, T, orig=orig)
    swapped_sir, swapped_air = invariance_regularisers(nat2, nat1, adv2, adv1, T, orig=orig)
    ref_swapped_sir, ref_swapped_air = reference(nat2, nat1, adv2, adv1, orig, T)
    assert torch.allclose(swapped_sir, ref_swapped_sir, atol=1e-12) and abs(sir - swapped_sir) > 1e-4
    assert torch.allclose(swapped_air, ref_swapped_air, atol=1e-12) and abs(air - swapped_air) > 1e-4
    same_sir, same_air = invariance_regularisers(nat1, nat1.clone(), adv1, adv1.clone(), T, orig=orig)
    assert abs(same_sir) < 1e-12 and abs(same_air) < 1e-12
    assert sir > 0 and air > 0


def test_projections_are_normalised_inside_and_temperature_applies():
    nat1, nat2, adv1, adv2, orig = inputs(requires_grad=False)
    scaled = invariance_regularisers(3 * nat1, 0.5 * nat2, 2 * adv1, adv2, T, orig=7 * orig)
    plain = invariance_regularisers(nat1, nat2, adv1, adv2, T, orig=orig)
    assert all(torch.allclose(s, p, atol=1e-12) for s, p in zip(scaled, plain))
    hot = invariance_regularisers(nat1, nat2, adv1, adv2, 0.1, orig=orig)
    assert all(torch.allclose(h, r, atol=1e-12) for h, r in zip(hot, reference(nat1, nat2, adv1, adv2, orig, 0.1)))


def test_bad_inputs_are_refused():
    nat1, nat2, adv1, adv2, orig = inputs(requires_grad=False)
    with pytest.raises(ValueError, match="orig"):
        invariance_regularisers(nat1, nat2, adv1, adv2, T)
    with pytest.raises(ValueError, match="kl_form"):
        invariance_regularisers(nat1, nat2, adv1, adv2, T, orig=orig, kl_form="reverse")
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        invariance_regularisers(nat1, nat2[:-1], adv1, adv2, T, orig=orig)


WORLD = 2


def rank_regularisers(seed):
    """One rank's share of the batch: its (SIR, AIR) and the gradients of their sum w.r.t. its rows."""
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        full = inputs(seed, batch=WORLD * B, requires_grad=False)
        mine = [t[rank * B:(rank + 1) * B].clone().requires_grad_(True) for t in full]
        sir, air = invariance_regularisers(*mine[:4], T, gather=True, orig=mine[4])
        (sir + air).backward()
        return sir.detach(), air.detach(), [t.grad for t in mine]
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_equal_one_process_on_the_whole_batch():
    """Every rank gets the global-batch value; gradients summed by the gather, averaged by DDP, equal one process's."""
    results = run_ranks(WORLD, rank_regularisers, 1)
    full = inputs(1, batch=WORLD * B)
    sir, air = invariance_regularisers(*full[:4], T, gather=False, orig=full[4])
    (sir + air).backward()
    for rank_sir, rank_air, _ in results:
        assert math.isclose(rank_sir, sir.item(), abs_tol=1e-12) and math.isclose(rank_air, air.item(), abs_tol=1e-12)
    for i, t in enumerate(full):
        averaged = torch.cat([grads[i] for _, _, grads in results]) / WORLD
        assert torch.allclose(averaged, t.grad, atol=1e-12)
