"""The figures: each has the panels it promises, draws the numbers it is given, and is a real, non-blank PNG."""
import numpy as np
import pytest
from matplotlib.image import imread

from advcl_dist.figures import DPI, plot_curves, plot_summary, plot_tsne
from advcl_dist.masking import STEPS_GRID, eps_grid
from advcl_dist.tsne import embed

EPS = 8 / 255


def curves(ra_vs_eps, ra_vs_steps, square):
    return {"n": 100, "SA": ra_vs_eps[0], "eps": EPS, "steps": 20, "eps_grid": eps_grid(EPS),
            "ra_vs_eps": ra_vs_eps, "steps_grid": list(STEPS_GRID), "ra_vs_steps": ra_vs_steps,
            "square": {"queries": 5000, "RA": square}}


SERIES = [("advcl + SLF", curves([80, 70, 60, 45, 30, 20, 1], [50, 47, 45, 44, 44], 52)),
          ("simclr + SLF", curves([75, 50, 30, 10, 3, 1, 0], [20, 14, 10, 9, 9], 15))]
ROWS = [{"method": m, "finetune": "slf", "SA": sa, "RA": ra, "AA": aa,
         "attack": {"pgd_steps": 20, "eps_255": 8.0}} for m, sa, ra, aa in
        [("advcl", 80.0, 45.0, 40.0), ("simclr", 75.0, 10.0, None)]]


def read_png(path, figure):
    """The PNG's pixels; it must be the figure's size (bbox "tight" trims margins only) and not blank."""
    image = imread(path)
    width, height = figure.get_size_inches() * DPI
    assert image.ndim == 3 and 0.7 * height <= image.shape[0] <= 1.1 * height
    assert 0.7 * width <= image.shape[1] <= 1.1 * width
    ink = (image[..., :3] < 0.9).any(-1).mean()  # share of pixels that are not (near) white
    assert 0.02 < ink < 0.6, ink
    return image


def lines_of(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_curves_have_one_line_per_method_in_both_panels_and_the_square_points(tmp_path):
    fig = plot_curves(SERIES, tmp_path / "curves.png")
    read_png(tmp_path / "curves.png", fig)
    eps_panel, steps_panel = fig.axes
    assert "RA vs ε" in eps_panel.get_title() and "RA vs PGD steps" in steps_panel.get_title()
    eps_lines, steps_lines = lines_of(eps_panel), lines_of(steps_panel)
    for label, c in SERIES:
        xs, ys = eps_lines[label]
        assert xs == pytest.approx([e * 255 for e in c["eps_grid"]]) and ys == c["ra_vs_eps"]
        assert steps_lines[label] == (list(STEPS_GRID), c["ra_vs_steps"])
        square = eps_lines[f"{label}: Square (5000 queries)"]
        assert square[0] == pytest.approx([8.0]) and square[1] == [c["square"]["RA"]]


def test_tsne_has_one_panel_per_method_with_every_point_coloured_by_class(tmp_path):
    rng = np.random.default_rng(0)
    panels = [(name, rng.normal(size=(60, 2)), np.repeat(np.arange(3), 20)) for name in ("advcl", "simclr", "acl")]
    fig = plot_tsne(panels, tmp_path / "tsne.png")
    read_png(tmp_path / "tsne.png", fig)
    assert [ax.get_title() for ax in fig.axes] == [f"{n} (60 test images)" for n, _, _ in panels]
    for ax, (_, points, classes) in zip(fig.axes, panels):
        drawn = np.concatenate([c.get_offsets() for c in ax.collections])
        assert len(ax.collections) == 3 and drawn.shape == (60, 2)
        np.testing.assert_allclose(drawn, points[np.argsort(classes, kind="stable")])


def test_summary_has_the_bars_the_curves_and_the_tsne_panels(tmp_path):
    rng = np.random.default_rng(0)
    panels = [(name, rng.normal(size=(30, 2)), np.arange(30) % 3) for name in ("advcl", "simclr")]
    fig = plot_summary(ROWS, SERIES, panels, tmp_path / "summary.png")
    read_png(tmp_path / "summary.png", fig)
    bars, eps_panel, steps_panel, *tsne = fig.axes
    assert len(tsne) == 2 and "RA vs ε" in eps_panel.get_title() and "PGD steps" in steps_panel.get_title()
    heights = [p.get_height() for p in bars.patches]  # SA of both rows, then RA, then AA (NaN: not run)
    assert heights[:4] == [80.0, 75.0, 45.0, 10.0] and heights[4] == 40.0 and np.isnan(heights[5])
    assert [t.get_text() for t in bars.get_xticklabels()] == ["advcl + SLF", "simclr + SLF"]
    bare = plot_summary(ROWS, [], [], tmp_path / "bare.png")  # no curves, no t-SNE: the bars alone
    read_png(tmp_path / "bare.png", bare)
    assert len(bare.axes) == 1


def test_tsne_keeps_well_separated_classes_apart():
    """Three Gaussian blobs in 64-D, 20 standard deviations apart: in 2-D every point's nearest neighbour
    is of its own class (the property a reader of the figure relies on)."""
    rng = np.random.default_rng(0)
    classes = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(120, 64)) + 20 * np.eye(64)[classes]
    points = embed(features, seed=0)
    assert points.shape == (120, 2)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.diag(np.full(120, np.inf))
    assert (classes[distances.argmin(1)] == classes).all()
    np.testing.assert_allclose(embed(features, seed=0), points)  # seeded: the same picture again
