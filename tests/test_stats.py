"""advcl_dist/stats.py against independent references: Wilson bounds found as roots of the score equation,
Newcombe's (1998) published single-proportion examples, scipy's Wilson interval, a hand-counted paired example
with Newcombe's method 10 and the exact McNemar p written out here, and the statistics module's mean / stdev."""
import math
import statistics
from statistics import NormalDist

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binomtest

from advcl_dist.stats import accuracy_interval, mean_std, paired_difference, wilson_interval

Z = NormalDist().inv_cdf(0.975)  # not stats.Z95: the reference draws its own quantile


def wilson_by_root(k: int, n: int) -> tuple[float, float]:
    """Wilson's bounds as the two p where the score statistic reaches z: |p̂ − p| = z·sqrt(p(1 − p)/n)."""
    p_hat = k / n

    def gap(p: float) -> float:
        return abs(p_hat - p) - Z * math.sqrt(p * (1 - p) / n)

    inside = min(max(p_hat, 1e-12), 1 - 1e-12)  # gap < 0 here; at p̂ = 0 or 1 the root p̂ itself is the other bound
    low = 0.0 if k == 0 else brentq(gap, 0.0, inside, xtol=1e-14)
    high = 1.0 if k == n else brentq(gap, inside, 1.0, xtol=1e-14)
    return low, high


def newcombe_reference(a, b) -> dict:
    """Newcombe (1998, Stat Med 17:2635), method 10, from the paper: with the 2×2 table of paired outcomes
    a = both right, b = A only, c = B only, d = neither, p1 = (a+b)/n, p2 = (a+c)/n, θ = p1 − p2,
    Wilson bounds (l1, u1), (l2, u2) and φ = (ad − bc)/sqrt((a+b)(c+d)(a+c)(b+d)) (0 when that is 0):
    L = θ − sqrt((p1−l1)² − 2φ(p1−l1)(u2−p2) + (u2−p2)²), U = θ + sqrt((u1−p1)² − 2φ(u1−p1)(p2−l2) + (p2−l2)²).
    McNemar's exact p: 2·P(X ≤ min(b, c)), X ~ Bin(b + c, 1/2), at most 1. Everything in points."""
    a_flags, b_flags = [bool(x) for x in a], [bool(x) for x in b]
    both = sum(1 for x, y in zip(a_flags, b_flags) if x and y)
    a_only = sum(1 for x, y in zip(a_flags, b_flags) if x and not y)
    b_only = sum(1 for x, y in zip(a_flags, b_flags) if y and not x)
    neither = len(a_flags) - both - a_only - b_only
    n = len(a_flags)
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson_by_root(both + a_only, n)
    l2, u2 = wilson_by_root(both + b_only, n)
    denominator = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / math.sqrt(denominator) if denominator else 0.0
    theta = p1 - p2
    low = theta - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = theta + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    m, s = a_only + b_only, min(a_only, b_only)
    p_value = min(1.0, 2 * sum(math.comb(m, i) for i in range(s + 1)) / 2 ** m) if m else 1.0
    return {"both": both, "a_only": a_only, "b_only": b_only, "neither": neither, "n": n,
            "difference": 100 * theta, "low": 100 * low, "high": 100 * high, "p_value": p_value}


HAND_A = [1, 1, 1, 1, 1, 1, 0, 0, 0, 1]
HAND_B = [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
# Counted by hand, image by image: both right on 0, 1, 2, 9 → 4; A only on 3, 4, 5 → 3; B only on 8 → 1;
# neither on 6, 7 → 2. Difference (3 − 1)/10 = 20 points. McNemar: X ~ Bin(4, 1/2), P(X ≤ 1) = (1 + 4)/16,
# p = 2·5/16 = 0.625. φ = (4·2 − 3·1)/sqrt(7·3·5·5) = 5/sqrt(525).
HAND = {"both": 4, "a_only": 3, "b_only": 1, "neither": 2, "n": 10, "difference": 20.0, "p_value": 0.625}


@pytest.mark.parametrize("k, n, low, high", [(81, 263, 25.53, 36.62), (15, 148, 6.24, 16.05), (0, 20, 0.0, 16.11),
                                              (1, 29, 0.61, 17.18)])
def test_wilson_matches_newcombes_published_examples(k, n, low, high):
    # Newcombe 1998, "Two-sided confidence intervals for the single proportion", Stat Med 17:857, Table I (method 3)
    got = accuracy_interval([True] * k + [False] * (n - k))
    assert (got["correct"], got["n"], got["low"], got["high"]) == (k, n, low, high)


def test_wilson_matches_the_score_equation_roots_and_scipy():
    for n in (1, 2, 5, 10, 29, 50, 100, 263, 1000, 10000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            low, high = wilson_interval(k, n)
            assert (low, high) == pytest.approx(wilson_by_root(k, n), abs=1e-10), (k, n)
            ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            assert (low, high) == pytest.approx((ci.low, ci.high), abs=1e-10), (k, n)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_paired_difference_on_the_hand_counted_example():
    got = paired_difference(np.array(HAND_A, bool), np.array(HAND_B, bool))
    reference = newcombe_reference(HAND_A, HAND_B)
    assert {k: reference[k] for k in HAND} == pytest.approx(HAND)  # the reference agrees with the hand count
    assert {k: got[k] for k in HAND} == pytest.approx(HAND)
    assert got["low"] == pytest.approx(reference["low"], abs=0.005 + 1e-9)  # stats rounds to 0.01 points
    assert got["high"] == pytest.approx(reference["high"], abs=0.005 + 1e-9)
    assert -100 < got["low"] < 0 < 20 < got["high"] < 100  # 10 images cannot tell the two apart


def test_paired_difference_matches_the_reference_on_random_and_edge_flags():
    rng = np.random.default_rng(0)
    cases = [(rng.random(n) < pa, rng.random(n) < pb) for n, pa, pb in
             ((50, 0.7, 0.6), (200, 0.3, 0.35), (1000, 0.8, 0.78), (37, 0.5, 0.5))]
    cases += [(np.ones(20, bool), np.ones(20, bool)),  # all agree: no discordant pair, φ undefined
              (np.ones(20, bool), np.arange(20) < 15),  # A perfect: a margin of the table is empty
              (np.arange(30) < 10, np.arange(30) >= 20)]  # no image right for both
    for a, b in cases:
        got, reference = paired_difference(a, b), newcombe_reference(a, b)
        for key in ("both", "a_only", "b_only", "neither", "n"):
            assert got[key] == reference[key]
        assert got["difference"] == pytest.approx(reference["difference"], abs=0.005 + 1e-9)
        assert got["low"] == pytest.approx(reference["low"], abs=0.005 + 1e-9)
        assert got["high"] == pytest.approx(reference["high"], abs=0.005 + 1e-9)
        assert got["p_value"] == pytest.approx(reference["p_value"], rel=1e-9)
    with pytest.raises(ValueError, match="same images"):
        paired_difference(np.ones(3, bool), np.ones(4, bool))


def test_mean_std_matches_the_statistics_module():
    for values in ([77.5, 79.25, 76.0], [1.0, 2.0], [3.0, -1.5, 2.25, 8.0, 0.0]):
        mean, std, count = mean_std(values)
        assert (mean, std, count) == pytest.approx((statistics.mean(values), statistics.stdev(values), len(values)))
    mean, std, count = mean_std([5.0, None, float("nan")])  # missing values (AA not run) are left out
    assert (mean, count) == (5.0, 1) and math.isnan(std)
    assert mean_std([])[2] == 0 and math.isnan(mean_std([])[0])
