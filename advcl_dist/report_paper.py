"""A sweep's results in the layout of the AdvCL paper's tables, with the published numbers beside ours.

Rows are methods (Tables 1 and 2) or the ablation's settings (Tables 4 and 5: the values each sweep point
set); column groups are dataset × finetuning mode (SLF / ALF / AFF), each with AA / RA / SA: ours, the
published numbers (advcl_dist/published.py: the paper, and the RobustSSL leaderboard where it has the
row) and the differences ours − published. A transfer result (Table 2) is labelled `<pretraining>→<evaluation>`
(e.g. cifar10→stl10). Several results in one cell (seeds) are averaged; the CSV says how many.

`write_paper_report(folder, table)` writes report_<table>.md, .csv and .png beside report.md
(tools/report.py --paper). The results are read by advcl_dist.report.gather, with its errors.
"""
from __future__ import annotations

import csv
import io
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config_schema import ConfigError
from .published import PAPER, Published, entries
from .report import _read_object, gather
from .run_folder import CONFIG, write_text

TABLES = ("table1", "table2", "table4", "table5")
MODES = ("SLF", "ALF", "AFF")
METRICS = ("AA", "RA", "SA")
CSV_COLUMNS = ("table", "row", "dataset", "finetune", "metric", "ours", "paper", "paper_diff", "leaderboard",
               "leaderboard_diff", "n_runs")
METHOD_ROWS = ("supervised_at", "apdpe", "rocl", "acl", "advcl", "dynacl", "dynacl++", "dynacl_air", "dynacl_air++",
               "deacl")
NAMES = {"supervised_at": "Supervised AT", "apdpe": "AP-DPE", "rocl": "RoCL", "acl": "ACL", "advcl": "AdvCL",
         "dynacl": "DynACL", "dynacl++": "DynACL++", "dynacl_air": "DynACL-AIR", "dynacl_air++": "DynACL-AIR++",
         "deacl": "DeACL"}


@dataclass(frozen=True)
class Layout:
    title: str
    rows: tuple[str, ...]  # the paper's row order (method tables)
    groups: tuple[tuple[str, str], ...]  # the paper's column groups: (dataset, mode)
    by_method: bool  # rows are methods; else the settings each sweep point set


def _groups(datasets: tuple[str, ...], modes: tuple[str, ...] = MODES) -> tuple[tuple[str, str], ...]:
    return tuple(itertools.product(datasets, modes))


LAYOUTS = {
    "table1": Layout("Table 1: pretraining and finetuning on the same dataset", METHOD_ROWS,
                     _groups(("cifar10", "cifar100")), True),
    "table2": Layout("Table 2: transfer, pretraining on CIFAR and finetuning + evaluating on STL-10", METHOD_ROWS,
                     _groups(("cifar10→stl10", "cifar100→stl10")), True),
    "table4": Layout("Table 4: AdvCL's views, with and without pseudo-labels", (), _groups(("cifar10",), ("SLF",)),
                     False),
    "table5": Layout("Table 5: AdvCL's pseudo-labels, f_pre and K", (), _groups(("cifar10",), ("SLF",)), False),
}


@dataclass
class Cell:
    ours: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(METRICS))
    n_runs: int = 0
    paper: Published | None = None
    board: Published | None = None

    def published(self, source: str) -> Published | None:
        return self.paper if source == "paper" else self.board

    def empty(self) -> bool:
        return not self.n_runs and self.paper is None and self.board is None


@dataclass
class PaperTable:
    table: str
    root: Path
    rows: list[str]
    groups: list[tuple[str, str]]
    cells: dict[tuple[str, tuple[str, str]], Cell]
    n_results: int

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.table]


def diff(ours: float | None, published: float | None) -> float | None:
    return None if ours is None or published is None else ours - published


def resolve_table(root: str | Path, requested: str) -> str:
    """`requested`, or for "auto" the table the sweep names (its sweep file's name, else its description)."""
    if requested in TABLES:
        return requested
    if requested != "auto":
        raise ConfigError(f"--paper {requested}: choose one of {', '.join(TABLES)} or auto")
    found = set()
    for path in sorted(Path(root).rglob("sweep.json")):
        spec = _read_object(path, "tools/submit.py --sweep writes it: move the damaged file away, or name the table "
                                  "with --paper table1|table2|table4|table5")
        for text in (Path(str(spec.get("sweep") or "")).stem, str(spec.get("description") or "")):
            match = re.search(r"table\s*_?([1245])\b", text, re.IGNORECASE)
            if match:
                found.add(f"table{match.group(1)}")
                break
    if len(found) != 1:
        raise ConfigError(f"--paper auto: cannot tell which of the paper's tables {root} reproduces (its sweep.json "
                          f"files name {sorted(found) or 'none'}); give --paper table1|table2|table4|table5")
    return found.pop()


def _pretraining_dataset(root: Path, result: dict) -> str | None:
    """data.name of the run: the sweep point's value, else the run folder's config.yaml."""
    if result.get("data.name"):
        return str(result["data.name"])
    path = root / result["run"] / CONFIG
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
        return str(config["data"]["name"])
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is damaged ({type(e).__name__}); it names the pretraining dataset of the results "
                          "beside it: restore it, or move that results.json away") from None


def _dataset_label(root: Path, result: dict) -> str:
    target = str(result["dataset"])
    source = _pretraining_dataset(root, result) or target
    return target if source == target else f"{source}→{target}"


def _value_text(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def _row_key(layout: Layout, result: dict, swept: list[str], sweep_of: str | None) -> str:
    if layout.by_method:
        return str(result["method"])
    label = ", ".join(f"{key.rsplit('.', 1)[-1]}={_value_text(result[key])}" for key in swept
                      if key != "data.name" and result.get(key) not in ("", None))
    if result["method"] != "advcl":
        label = f"{result['method']}: {label}" if label else str(result["method"])
    label = label or str(result["method"])
    return f"{sweep_of}: {label}" if sweep_of else label


def build(root: str | Path, table: str) -> PaperTable:
    """The cells of `table` from every results.json under `root` and the published entries of that table."""
    root, layout = Path(root).resolve(), LAYOUTS[table]
    columns, results = gather(root)
    swept = columns[1:columns.index("method")]
    sweeps = sorted({p.parent for p in root.rglob("sweep.json")}, key=lambda p: len(p.parts), reverse=True)
    cells: dict[tuple[str, tuple[str, str]], Cell] = {}
    runs: dict[tuple[str, tuple[str, str]], list[dict]] = {}
    for result in results:
        folder = root / result["run"]
        home = next((s for s in sweeps if folder.is_relative_to(s)), None)
        sweep_of = str(home.relative_to(root)) if len(sweeps) > 1 and home is not None else None
        key = (_row_key(layout, result, swept, sweep_of), (_dataset_label(root, result), result["finetune"]))
        runs.setdefault(key, []).append(result)
    for key, found in runs.items():
        values = {m: [r[m] for r in found if r.get(m) is not None] for m in METRICS}
        cells[key] = Cell({m: sum(v) / len(v) if v else None for m, v in values.items()}, len(found))
    for entry in entries(table):
        key = (entry.row, (entry.dataset, entry.finetune))
        cells.setdefault(key, Cell())
        setattr(cells[key], "paper" if entry.source == "paper" else "board", entry)
    present = list(dict.fromkeys(row for row, _ in cells))
    rows = [r for r in layout.rows if r in present] + [r for r in present if r not in layout.rows]
    # Datasets with our results first (in the sweep's order), then the paper's; modes in the paper's order.
    datasets = list(dict.fromkeys([d for (_, (d, _)), c in cells.items() if c.n_runs]
                                  + [d for d, _ in layout.groups] + [d for _, (d, _) in cells]))
    modes = list(dict.fromkeys([*MODES, *(m for _, (_, m) in cells)]))
    groups = [g for g in itertools.product(datasets, modes) if any(not cells.get((r, g), Cell()).empty() for r in rows)]
    for row, group in itertools.product(rows, groups):
        cells.setdefault((row, group), Cell())
    return PaperTable(table, root, rows, groups, cells, len(results))


def _num(value: float | None, signed: bool = False, mark: bool = False) -> str:
    if value is None:
        return "—"
    return (f"{value:+.2f}" if signed else f"{value:.2f}") + ("*" if mark else "")


def _name(row: str) -> str:
    return NAMES.get(row, row)


def _layout_tables(pt: PaperTable) -> list[str]:
    """Ours only, one table per dataset we have results on: its rows × (mode, metric) columns."""
    parts = []
    for dataset in dict.fromkeys(d for (_, (d, _)), c in pt.cells.items() if c.n_runs):
        modes = [m for d, m in pt.groups if d == dataset]
        lines = ["| " + " | ".join(["row"] + [f"{m} {k}" for m in modes for k in METRICS]) + " |",
                 "|---" + "|---:" * (len(modes) * len(METRICS)) + "|"]
        for row in pt.rows:
            cells = [pt.cells[(row, (dataset, m))] for m in modes]
            if not any(c.n_runs for c in cells):
                continue
            lines.append("| " + " | ".join([_name(row)] + [_num(c.ours[k]) for c in cells for k in METRICS]) + " |")
        parts.append(f"### {dataset}\n\n" + "\n".join(lines) + "\n")
    return parts


def _comparison_table(pt: PaperTable, group: tuple[str, str]) -> str:
    head = ["row"]
    for metric in METRICS:
        head += [f"{metric} ours", "paper", "Δ"] + ([] if metric == "RA" else ["leaderboard", "Δ"])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in pt.rows:
        cell, parts = pt.cells[(row, group)], [_name(row)]
        if cell.empty():  # neither ours nor published in this column group
            continue
        for metric in METRICS:
            ours = cell.ours[metric]
            for source in ("paper", "leaderboard"):
                entry = cell.published(source)
                if metric == "RA" and source == "leaderboard":
                    continue
                value = entry.value(metric) if entry else None
                parts += ([_num(ours)] if source == "paper" else []) + [
                    _num(value, mark=bool(entry) and metric in entry.unchecked), _num(diff(ours, value), signed=True)]
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def _sources(pt: PaperTable) -> list[str]:
    cites: dict[str, list[str]] = {}
    for (row, group), cell in pt.cells.items():
        for entry in (cell.paper, cell.board):
            if entry is not None and group in pt.groups:
                cites.setdefault(entry.cite, []).append(_name(row))
    return [f"- {cite}: {', '.join(dict.fromkeys(rows))}" for cite, rows in cites.items()]


def markdown(pt: PaperTable) -> str:
    text = [f"# AdvCL paper, {pt.layout.title}: ours beside the published numbers\n",
            f"{pt.n_results} results under {pt.root}. Accuracies in % on the test split: SA clean, RA = PGD-20, "
            "AA = AutoAttack (standard); a transfer column reads pretraining→evaluation dataset. Published: the paper "
            f"({PAPER}) and the RobustSSL leaderboard (AA and SA only); Δ = ours − published; — = not measured or not "
            "published; * = a published number not checked against the paper's own text (see Sources). A cell with "
            "several runs shows their mean (n_runs in the CSV).\n", "## Ours, in the paper's layout\n",
            *_layout_tables(pt), "## Ours and the published numbers\n"]
    text += [f"### {dataset}, {mode}\n\n" + _comparison_table(pt, (dataset, mode)) for dataset, mode in pt.groups]
    sources = _sources(pt)
    text += ["## Sources\n", "\n".join(sources) + "\n" if sources else "No published numbers for these cells.\n"]
    return "\n".join(text)


def csv_text(pt: PaperTable) -> str:
    """One line per row × dataset × mode × metric (long form); empty fields where a value is missing."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for row, (dataset, mode) in itertools.product(pt.rows, pt.groups):
        cell = pt.cells[(row, (dataset, mode))]
        if cell.empty():
            continue
        for metric in METRICS:
            ours = cell.ours[metric]
            paper = cell.paper.value(metric) if cell.paper else None
            board = cell.board.value(metric) if cell.board else None
            values = (pt.table, row, dataset, mode, metric, ours, paper, diff(ours, paper), board, diff(ours, board),
                      cell.n_runs)
            writer.writerow(["" if v is None else v for v in values])
    return out.getvalue()


def write_paper_report(root: str | Path, table: str) -> tuple[str, list[Path]]:
    """report_<table>.md / .csv / .png in `root`; returns the markdown and the files written."""
    pt = build(root, table)
    if not pt.n_results:
        raise FileNotFoundError(f"no results.json under {root}: no finetuning/evaluation has finished there yet")
    paths = [Path(root) / f"report_{table}.{ext}" for ext in ("md", "csv", "png")]
    text = markdown(pt)
    write_text(text, paths[0])
    write_text(csv_text(pt), paths[1])
    from .report_figure import plot  # matplotlib: imported only to draw

    plot(pt, paths[2])
    return text, paths
