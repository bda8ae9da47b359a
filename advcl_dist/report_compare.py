"""The report's trust sections: mean ± std over `train.seed`, and a paired comparison of two methods.

Seeds: rows that differ only in `train.seed` (a sweep's `grid: {train.seed: [0, 1, 2]}`) form one group, shown as
mean ± sample std over its seeds, since a difference smaller than the spread between seeds is not a result.

Paired comparison (tools/report.py DIR --compare A B): every run of method A is paired with the run of method B
that has the same settings (finetune, dataset, every swept value, the seed too). Both runs were evaluated on the
same test images, so the comparison reads their per-image correctness flags (flags.npz, written by the
evaluation beside results.json) and counts the images only one of them gets right: the difference A − B in
points with Newcombe's paired interval and McNemar's exact p (advcl_dist/stats.py). Over several seeds, the
per-seed differences are also summarised as mean ± std.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .config_schema import ConfigError
from .report import METRICS, NUMBER_COLUMNS, csv_text, markdown
from .stats import mean_std, paired_difference

SEED = "train.seed"
FLAGS = "flags.npz"
METHOD_COLUMNS = ("method", "train.method")  # what differs between the two sides of a pair
NOT_COMPARED = "AA on different images: not compared"
SEEDS_TITLE = "## Mean ± std over seeds"
COMPARE_TITLE = "## Paired comparison"


def _value_key(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _key(row: dict, columns: list[str]) -> tuple[str, ...]:
    return tuple(_value_key(row.get(c)) for c in columns)


def settings_columns(columns: list[str], leave_out: tuple[str, ...]) -> list[str]:
    """The columns that say how a run was made: not its folder, not what it measured, not `leave_out`."""
    return [c for c in columns if c != "run" and c not in NUMBER_COLUMNS and c not in leave_out]


def spread_cell(stats: tuple[float, float, int], seeds: int, signed: bool = False) -> str:
    """`mean ± std` of (mean, std, count); the mean alone for one seed; notes when some seeds lack the value."""
    mean, std, count = stats
    if not count:
        return "—"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    text = text if count < 2 else f"{text} ± {std:.2f}"
    return text if count == seeds else f"{text} ({count} of {seeds} seeds)"


def _number(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else value


def seed_groups(columns: list[str], rows: list[dict]) -> tuple[list[str], list[dict]]:
    """(settings columns, one entry per group of rows differing only in train.seed with `seeds` and the
    (mean, std, count) of each metric); ([], []) when no group has two seeds."""
    if SEED not in columns:
        return [], []
    keys = settings_columns(columns, (SEED,))
    groups: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        groups.setdefault(_key(row, keys), []).append(row)
    if all(len({_value_key(r[SEED]) for r in group}) < 2 for group in groups.values()):
        return [], []
    return keys, [{**{k: group[0][k] for k in keys}, "seeds": len(group),
                   **{m: mean_std([r[m] for r in group]) for m in METRICS}} for group in groups.values()]


def seeds_section(columns: list[str], rows: list[dict]) -> tuple[str, str] | None:
    """(markdown section, report_seeds.csv) of the seed groups; None without a group of several seeds."""
    keys, groups = seed_groups(columns, rows)
    if not groups:
        return None
    cells = [{**{k: g[k] for k in keys}, "seeds": g["seeds"], **{m: spread_cell(g[m], g["seeds"]) for m in METRICS}}
             for g in groups]
    table = markdown([*keys, "seeds", *METRICS], cells)
    section = (f"{SEEDS_TITLE}\n\nRuns that differ only in {SEED}: mean ± sample standard deviation over the seeds "
               f"(one seed: the mean alone).\n\n{table}")
    stats_columns = [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n")]
    numbers = [{**{k: g[k] for k in keys}, "seeds": g["seeds"],
                **{f"{m}_{s}": _number(v) for m in METRICS for s, v in zip(("mean", "std", "n"), g[m])}}
               for g in groups]
    return section, csv_text([*keys, "seeds", *stats_columns], numbers)


def pair_runs(columns: list[str], rows: list[dict], a: str, b: str) -> tuple[list[str], list[tuple[dict, dict]]]:
    """(settings columns, (row of A, row of B) for each run of A that has a run of B with the same settings).
    Several matches (a method run both as a sweep's train.method and as another point's baseline) are narrowed
    to the run in the same pipeline folder."""
    found = ", ".join(sorted({str(r["method"]) for r in rows}))
    if a == b:
        raise ConfigError(f"--compare {a} {b}: give two different methods (methods found: {found})")
    keys = settings_columns(columns, METHOD_COLUMNS)
    pairs = []
    for row in (r for r in rows if r["method"] == a):
        matches = [r for r in rows if r["method"] == b and _key(r, keys) == _key(row, keys)]
        if len(matches) > 1:
            matches = [r for r in matches if Path(r["run"]).parent == Path(row["run"]).parent]
        if len(matches) > 1:
            raise ConfigError(f"run {row['run']} ({a}) has several runs of {b} with the same settings "
                              f"({', '.join(r['run'] for r in matches)}); report on a folder that holds one of them")
        if matches:
            pairs.append((row, matches[0]))
    if not pairs:
        raise ConfigError(f"--compare {a} {b}: no run of {a!r} has a run of {b!r} with the same finetune, dataset "
                          f"and swept values; methods found: {found or 'none'}")
    return keys, pairs


def read_flags(path: Path) -> dict[str, np.ndarray]:
    """Per-image correctness of one evaluated run: index, SA, RA (every test image), AA and aa_index (the AA
    images; files from before aa_index was recorded ran AA on the first len(autoattack) test images)."""
    fix = f"re-run tools/evaluate.py on {path.parent} (the evaluation writes the per-image flags beside results.json)"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            saved = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path} is not a readable flags file ({e}); {fix}") from None
    if any(k not in saved for k in ("index", "clean", "robust")):
        raise ConfigError(f"{path} lacks 'index', 'clean' or 'robust' (it holds {sorted(saved)}); {fix}")
    aa = saved.get("autoattack", np.zeros(0, bool)).astype(bool).ravel()
    flags = {"index": saved["index"].ravel(), "SA": saved["clean"].astype(bool).ravel(),
             "RA": saved["robust"].astype(bool).ravel(), "AA": aa,
             "aa_index": saved["aa_index"].ravel() if "aa_index" in saved else np.arange(len(aa))}
    if not len(flags["SA"]) == len(flags["RA"]) == len(flags["index"]) or len(flags["aa_index"]) != len(aa):
        raise ConfigError(f"{path}: its flag arrays differ in length from 'index' / 'aa_index'; {fix}")
    return flags


def compare_runs(root: Path, row_a: dict, row_b: dict) -> dict:
    """metric → paired_difference of A − B, NOT_COMPARED (AA on different images) or None (no AA)."""
    path_a, path_b = root / row_a["run"] / FLAGS, root / row_b["run"] / FLAGS
    a, b = read_flags(path_a), read_flags(path_b)
    if not np.array_equal(a["index"], b["index"]):
        raise ConfigError(f"{path_a} and {path_b} hold different test images (their 'index' arrays differ): "
                          "compare runs evaluated on the same test split")
    result = {m: paired_difference(a[m], b[m]) for m in ("SA", "RA")}
    result["AA"] = None
    if len(a["AA"]) and len(b["AA"]):
        same = np.array_equal(a["aa_index"], b["aa_index"])
        result["AA"] = paired_difference(a["AA"], b["AA"]) if same else NOT_COMPARED
    return result


def comparison(root: Path, columns: list[str], rows: list[dict], a: str, b: str) -> tuple[list[str], list[dict]]:
    """(settings columns, lines): one line per pair, then per group of seeds a line of the mean ± std of the
    per-seed differences."""
    keys, pairs = pair_runs(columns, rows, a, b)
    groups: dict[tuple[str, ...], list[dict]] = {}
    for row_a, row_b in pairs:
        line = {**{k: row_a[k] for k in keys}, "kind": "pair", "run_A": row_a["run"], "run_B": row_b["run"],
                **compare_runs(root, row_a, row_b)}
        groups.setdefault(_key(row_a, [k for k in keys if k != SEED]), []).append(line)
    lines = []
    for group in groups.values():
        lines += group
        if SEED in keys and len(group) > 1:
            lines.append({**group[0], SEED: f"mean ± std ({len(group)} seeds)", "kind": "mean ± std over seeds",
                          "run_A": "", "run_B": "", "seeds": len(group),
                          **{m: mean_std([g[m]["difference"] for g in group if isinstance(g[m], dict)])
                             for m in METRICS}})
    return keys, lines


def _difference_cells(value, seeds: int) -> tuple[str, str]:
    if isinstance(value, dict):
        return (f"{value['difference']:+.2f} ({value['low']:+.2f} to {value['high']:+.2f})",
                f"{value['a_only']} / {value['b_only']}, p = {value['p_value']:.3g}")
    if isinstance(value, tuple):
        return spread_cell(value, seeds, signed=True), ""
    return (value or "—"), "—"


def _difference_numbers(value, metric: str) -> dict:
    names = ("diff", "low", "high", "std", "a_only", "b_only", "n", "p", "note")
    out = dict.fromkeys((f"{metric}_{n}" for n in names), None)
    if isinstance(value, dict):
        out.update({f"{metric}_diff": value["difference"], f"{metric}_low": value["low"],
                    f"{metric}_high": value["high"], f"{metric}_a_only": value["a_only"],
                    f"{metric}_b_only": value["b_only"], f"{metric}_n": value["n"], f"{metric}_p": value["p_value"]})
    elif isinstance(value, tuple):
        out.update({f"{metric}_diff": _number(value[0]), f"{metric}_std": _number(value[1])})
    elif value:
        out[f"{metric}_note"] = value
    return out


def compare_section(root: Path, columns: list[str], rows: list[dict], a: str, b: str) -> tuple[str, str]:
    """(markdown section, report_compare.csv) of the paired comparison A − B."""
    keys, lines = comparison(root, columns, rows, a, b)
    titles = {m: (f"{m}: A − B (95 %)", f"{m}: A-only / B-only, p") for m in METRICS}
    cells = []
    for line in lines:
        cell = {**{k: line[k] for k in keys}, "run A": line["run_A"], "run B": line["run_B"]}
        for m, (difference, counts) in titles.items():
            cell[difference], cell[counts] = _difference_cells(line[m], line.get("seeds", 1))
        cells.append(cell)
    table = markdown([*keys, "run A", "run B", *(t for pair in titles.values() for t in pair)], cells)
    section = (f"{COMPARE_TITLE} {a} − {b}\n\nA = {a}, B = {b}, on the same test images: the difference in accuracy "
               "(points) with Newcombe's paired 95 % interval; A-only / B-only = images only A / only B gets right; "
               f"p = exact McNemar test.\n\n{table}")
    numbers = [{**{k: line[k] for k in keys}, "kind": line["kind"], "run_A": line["run_A"], "run_B": line["run_B"],
                **{k: v for m in METRICS for k, v in _difference_numbers(line[m], m).items()}} for line in lines]
    number_columns = [*keys, "kind", "run_A", "run_B", *(k for m in METRICS for k in _difference_numbers(None, m))]
    return section, csv_text(number_columns, numbers)


def against_main(root: Path, main: str) -> str:
    """A pipeline summary's paired comparisons, one row per other method and finetuning mode: the pipeline's own
    method `main` minus that method on the same images (difference, 95 % interval, McNemar p); a line saying why
    instead of a row that cannot be computed (a run without flags.npz)."""
    from .report import gather

    columns, rows = gather(root)
    if not any(r["method"] == main for r in rows):
        return ""
    lines = ["| A − B | finetune | SA | RA | AA |", "|---|---|---:|---:|---:|"]
    problems = []
    for other in dict.fromkeys(str(r["method"]) for r in rows if r["method"] != main):
        try:
            _, pairs = pair_runs(columns, rows, main, other)
            for row_a, row_b in pairs:
                result = compare_runs(root, row_a, row_b)
                cells = [_short(result[m]) for m in METRICS]
                lines.append(f"| {main} − {other} | {row_a['finetune']} | " + " | ".join(cells) + " |")
        except ConfigError as e:
            problems.append(f"- {main} − {other}: not computed ({e})")
    if len(lines) == 2 and not problems:
        return ""
    return (f"{COMPARE_TITLE}s on the same test images\n\nA − B in points, Newcombe's paired 95 % interval, exact "
            "McNemar p (tools/report.py --compare A B gives the counts).\n\n" + "\n".join(lines) + "\n"
            + "".join(f"{p}\n" for p in problems))


def _short(value) -> str:
    if isinstance(value, dict):
        return f"{value['difference']:+.2f} ({value['low']:+.2f} to {value['high']:+.2f}), p = {value['p_value']:.2g}"
    return value or "—"
