"""The figure of a paper-layout report (report_paper.py): SA against AA per column group, ours beside the
published numbers, like the AdvCL paper's Figure 1."""
from __future__ import annotations

import math
from pathlib import Path

from .report_paper import Cell, PaperTable, _name


def _points(cell: Cell) -> tuple[tuple[float, float] | None, list[tuple[tuple[float, float], str]]]:
    """(AA, SA) of ours, and of the published entries with their markers; None / left out when incomplete."""
    def point(aa, sa):
        return None if aa is None or sa is None else (aa, sa)

    published = [(point(e.AA, e.SA), marker) for e, marker in ((cell.paper, "o"), (cell.board, "s")) if e is not None]
    return point(cell.ours["AA"], cell.ours["SA"]), [(p, marker) for p, marker in published if p]


def plot(pt: PaperTable, path: Path) -> None:
    """SA against AA per column group (like the paper's Figure 1): ours filled, the paper's numbers hollow
    circles, the leaderboard's hollow squares, an arrow from the published point to ours."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from .figures import save_figure

    groups = [g for g in pt.groups if any(any(_points(pt.cells[(r, g)])) for r in pt.rows)]
    cols, n = min(3, max(1, len(groups))), max(1, len(groups))
    fig = Figure(figsize=(4.2 * cols, 3.6 * math.ceil(n / cols) + 0.4), layout="constrained")
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel()
    palette = colormaps["tab10" if len(pt.rows) <= 10 else "tab20"]
    color = {row: palette(i % palette.N) for i, row in enumerate(pt.rows)}
    drawn: set[str] = set()
    for ax, group in zip(axes, groups):
        for row in pt.rows:
            ours, published = _points(pt.cells[(row, group)])
            for p, marker in published:
                ax.scatter(*p, marker=marker, facecolors="none", edgecolors=[color[row]], s=55, linewidths=1.5)
            if ours:
                ax.scatter(*ours, marker="o", color=color[row], s=55)
            if ours and published:
                ax.annotate("", xy=ours, xytext=published[0][0], arrowprops={"arrowstyle": "->", "color": color[row]})
            if ours or published:
                drawn.add(row)
        ax.set(title=f"{group[0]}, {group[1]}", xlabel="AA (%)", ylabel="SA (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(groups):]:
        ax.axis("off")
    if not groups:
        axes[0].text(0.5, 0.5, "no row has both AA and SA", ha="center", va="center", transform=axes[0].transAxes)
    handles = [Line2D([], [], marker="o", ls="", color=color[r], label=_name(r)) for r in pt.rows if r in drawn]
    handles += [Line2D([], [], marker=m, ls="", color="k", mfc=f, label=label)
                for m, f, label in (("o", "k", "ours"), ("o", "none", "paper"), ("s", "none", "leaderboard"))]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7)
    fig.suptitle(f"AdvCL paper, {pt.layout.title}", fontsize=10)
    save_figure(fig, path)
