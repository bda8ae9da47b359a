"""The figures a reader looks at instead of a table: robustness curves, t-SNE panels, the demo's summary.

- `plot_curves`: RA against ε and against PGD steps, one line per method (the paper's Figure 3), with the
  black-box Square point at the run's ε; written beside results.json by an evaluation with `eval.curves`.
- `plot_tsne`: 2-D t-SNE of test-set features coloured by class, one panel per method (Figure 4).
- `plot_summary`: SA / RA / AA bars per method, with the curves and the t-SNE panels when there are any.

matplotlib's object API (`Figure`, no pyplot): no global state and no display backend, so it is safe in
any worker process; every file is written atomically.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .run_folder import atomic_write

DPI = 120


def save_figure(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    atomic_write(Path(path), lambda f: f.write(buffer.getvalue()))


def _curve_axes(ax_eps, ax_steps, series: list[tuple[str, dict]]) -> None:
    for i, (label, c) in enumerate(series):
        color = f"C{i}"
        eps_255 = [e * 255 for e in c["eps_grid"]]
        ax_eps.plot(eps_255, c["ra_vs_eps"], "o-", color=color, label=label)
        if "square" in c:
            ax_eps.plot([c["eps"] * 255], [c["square"]["RA"]], "x", color=color, markersize=9, mew=2,
                        label=f"{label}: Square ({c['square']['queries']} queries)")
        ax_steps.plot(c["steps_grid"], c["ra_vs_steps"], "o-", color=color, label=label)
    if series:
        run = series[0][1]
        ax_eps.axvline(run["eps"] * 255, color="grey", lw=0.8, ls=":")
        ax_eps.set_title(f"RA vs ε (PGD-{run['steps']}, {run['n']} images)")
        ax_steps.set_title(f"RA vs PGD steps (ε = {run['eps'] * 255:.3g}/255)")
        ax_steps.set_xscale("log")
        ax_steps.set_xticks(run["steps_grid"], [str(k) for k in run["steps_grid"]])
    ax_eps.set_xlabel("ε (/255)")
    ax_steps.set_xlabel("PGD steps")
    for ax in (ax_eps, ax_steps):
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def plot_curves(series: list[tuple[str, dict]], path: Path) -> Figure:
    """`series`: (label, masking.robustness_curves output) per method; two panels."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    _curve_axes(*fig.subplots(1, 2), series)
    save_figure(fig, path)
    return fig


def _tsne_axis(ax, label: str, points: np.ndarray, classes: np.ndarray) -> None:
    for k in np.unique(classes):
        mask = classes == k
        ax.scatter(points[mask, 0], points[mask, 1], s=4, color=f"C{int(k) % 10}", label=str(int(k)))
    ax.set_title(f"{label} ({len(points)} test images)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_tsne(panels: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> Figure:
    """`panels`: (label, t-SNE points [n, 2], classes [n]) per method; one panel each."""
    fig = Figure(figsize=(4 * len(panels), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (label, points, classes) in zip(axes, panels):
        _tsne_axis(ax, label, points, classes)
    axes[-1].legend(title="class", fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    save_figure(fig, path)
    return fig


def _bars(ax, rows: list[dict]) -> None:
    metrics = ("SA", "RA", "AA")
    width = 0.8 / len(metrics)
    labels = [f"{r['method']} + {r['finetune'].upper()}" for r in rows]
    for j, metric in enumerate(metrics):
        values = [np.nan if r.get(metric) is None else r[metric] for r in rows]
        positions = np.arange(len(rows)) + (j - 1) * width
        # the 95 % Wilson interval as an error bar where the evaluation recorded one (results.json "intervals")
        spans = [(r.get("intervals") or {}).get(metric) for r in rows]
        errors = np.array([[v - s["low"], s["high"] - v] if s and v == v else [np.nan, np.nan]
                           for v, s in zip(values, spans)]).T
        bars = ax.bar(positions, values, width, label=metric, color=f"C{j}",
                      yerr=errors if np.isfinite(errors).any() else None, capsize=2, error_kw={"lw": 0.8})
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    if rows:
        a = rows[0]["attack"]
        ax.set_title(f"SA / RA (PGD-{a['pgd_steps']}) / AA, ε = {a['eps_255']:.3g}/255 (whiskers: 95 % Wilson)",
                     fontsize=9)


def plot_summary(rows: list[dict], curves: list[tuple[str, dict]], tsne: list[tuple[str, np.ndarray, np.ndarray]],
                 path: Path) -> Figure:
    """Row 1: the bars and, when measured, the two curve panels; row 2 (when given): the t-SNE panels."""
    top = 1 + 2 * bool(curves)
    columns = max(top, len(tsne))
    fig = Figure(figsize=(4.5 * columns, 4.2 * (1 + bool(tsne))), layout="constrained")
    grid = fig.add_gridspec(1 + bool(tsne), columns)
    _bars(fig.add_subplot(grid[0, 0]), rows)
    if curves:
        _curve_axes(fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[0, 2]), curves)
    for i, (label, points, classes) in enumerate(tsne):
        ax = fig.add_subplot(grid[1, i])
        _tsne_axis(ax, label, points, classes)
    if tsne:
        ax.legend(title="class", fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    save_figure(fig, path)
    return fig
