"""The figures of a pipeline folder, from its results.json rows: curves.png, tsne.png and summary.png.

Written by the pipeline beside summary.md (`pipeline.figures`), and again on demand by tools/plot.py.
- curves.png: every row that measured robustness curves (`eval.curves`), one line each;
- tsne.png: one panel per pretrained encoder that has a row (its `pretrained` checkpoint);
- summary.png: the SA / RA / AA bars with both.
"""
from __future__ import annotations

from pathlib import Path

from .config import Config, config_from_yaml
from .engine import CHECKPOINT
from .evaluate import CURVES, RESULTS
from .figures import plot_curves, plot_summary, plot_tsne
from .run_folder import CONFIG, read_json
from .tsne import TSNE, tsne_panels

SUMMARY = "summary.png"


def label(row: dict) -> str:
    return f"{row['method']} + {row['finetune'].upper()}"


def curve_series(rows: list[dict]) -> list[tuple[str, dict]]:
    return [(label(r), r["curves"]) for r in rows if r.get("curves")]


def encoders(rows: list[dict]) -> list[tuple[str, Path]]:
    """(method, pretraining checkpoint) of every row, each encoder once, in row order."""
    seen: dict[str, tuple[str, Path]] = {}
    for r in rows:
        if r.get("pretrained"):
            seen.setdefault(r["pretrained"], (r["method"], Path(r["pretrained"])))
    return list(seen.values())


def write_figures(rows: list[dict], root: Path, cfg: Config, tsne_n: int, device="cpu") -> list[Path]:
    """Every figure the rows allow, into `root`; returns the files written."""
    root, written = Path(root), []
    series = curve_series(rows)
    if series:
        plot_curves(series, root / CURVES)
        written.append(root / CURVES)
    panels = tsne_panels(encoders(rows), cfg, tsne_n, device=device) if tsne_n else []
    if panels:
        plot_tsne(panels, root / TSNE)
        written.append(root / TSNE)
    if rows:
        plot_summary(rows, series, panels, root / SUMMARY)
        written.append(root / SUMMARY)
    return written


def rows_of(folder: Path) -> list[dict]:
    """The results.json rows under `folder` (a pipeline's summary.json when there is one), in path order."""
    folder = Path(folder)
    summary = read_json(folder / "summary.json")
    if summary is not None:
        return summary["rows"]
    return [read_json(p) for p in sorted(folder.rglob(RESULTS))]


def config_of(folder: Path) -> Config:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a run or pipeline folder of this package "
                                "(every run writes its resolved config.yaml)")
    return config_from_yaml(path.read_text())


def plot_folder(what: str, folder: Path, tsne_n: int, seed: int = 0, device="cpu") -> list[Path]:
    """tools/plot.py: `what` ∈ {tsne, curves, summary} of a pipeline folder (its rows), or t-SNE of a
    pretraining run folder's checkpoint.pt."""
    folder = Path(folder)
    rows = rows_of(folder)
    if what == "tsne":
        checkpoints = encoders(rows) or ([(folder.name, folder / CHECKPOINT)]
                                         if (folder / CHECKPOINT).is_file() else [])
        if not checkpoints:
            raise FileNotFoundError(f"no pretrained encoder found under {folder}: give a pipeline folder (with "
                                    f"results.json files) or a pretraining run folder (with {CHECKPOINT})")
        plot_tsne(tsne_panels(checkpoints, config_of(folder), tsne_n, seed, device), folder / TSNE)
        return [folder / TSNE]
    if not rows:
        raise FileNotFoundError(f"no results.json under {folder}: evaluate first (tools/evaluate.py)")
    if what == "curves":
        series = curve_series(rows)
        if not series:
            raise FileNotFoundError(f"no results.json under {folder} has robustness curves: evaluate with "
                                    "eval.curves=true")
        plot_curves(series, folder / CURVES)
        return [folder / CURVES]
    return write_figures(rows, folder, config_of(folder), tsne_n, device)
