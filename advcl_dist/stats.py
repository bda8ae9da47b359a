"""How far a measured accuracy can be trusted: Wilson intervals, paired differences, spread over seeds.

An accuracy is a count of correct images out of n, so its uncertainty is binomial. The Wilson score interval
(Wilson 1927) keeps its coverage near 95 % at the small n AutoAttack is often run on (50–1000 images) and at
accuracies near 0 or 100 %, where the textbook p ± 1.96·se interval is too narrow or leaves [0, 1].

Two methods evaluated on the same test images are compared on the images, not on the two accuracies: only the
images one gets right and the other wrong (the discordant pairs) carry information about the difference. The
interval of the difference is Newcombe's method 10 (Newcombe 1998, "Improved confidence intervals for the
difference between binomial proportions based on paired data"), built from the two Wilson intervals and the
correlation of the paired flags; the p-value is McNemar's exact test (a two-sided binomial test of the
discordant pairs at 1/2, scipy's `binomtest`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion correct / n, as fractions in [0, 1]."""
    if n <= 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(flags) -> dict:
    """{"correct", "n", "low", "high"} of per-image correctness flags; low and high in percent."""
    flags = np.asarray(flags).astype(bool)
    correct, n = int(flags.sum()), int(flags.size)
    low, high = wilson_interval(correct, n)
    return {"correct": correct, "n": n, "low": _percent(low), "high": _percent(high)}


def paired_difference(a, b, z: float = Z95) -> dict:
    """Accuracy of A minus accuracy of B on the same images (flags in the same order), in points, with
    Newcombe's paired interval and McNemar's exact p-value; the four counts say where the difference comes from.
    """
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired flags must be two 1-D arrays over the same images; got shapes {a.shape}, {b.shape}")
    n = int(a.size)
    both, a_only = int((a & b).sum()), int((a & ~b).sum())
    b_only, neither = int((~a & b).sum()), int((~a & ~b).sum())
    result = {"n": n, "both": both, "a_only": a_only, "b_only": b_only, "neither": neither}
    if n == 0:
        return {**result, "difference": math.nan, "low": math.nan, "high": math.nan, "p_value": math.nan}
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson_interval(both + a_only, n, z)
    l2, u2 = wilson_interval(both + b_only, n, z)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    theta = p1 - p2
    return {**result, "difference": _percent(theta), "low": _percent(max(-1.0, theta - below)),
            "high": _percent(min(1.0, theta + above)), "p_value": mcnemar_exact(a_only, b_only)}


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs as a binomial(a_only + b_only, 1/2)."""
    if a_only + b_only == 0:
        return 1.0
    from scipy.stats import binomtest  # imported only when two runs are compared

    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n − 1; NaN for a single value) and count of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan, 0
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else math.nan
    return mean, std, len(finite)


def _percent(fraction: float) -> float:
    return round(100.0 * fraction, 2)
