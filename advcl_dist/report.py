"""One table of every results.json under a folder: a pipeline, a sweep, or a whole runs/ tree.

For a sweep (a `sweep.json` written by tools/submit.py), each row also shows the values its point
set, so a grid over `pseudo.ks` reads as the K ablation it is. Each accuracy shows its Wilson 95 % interval
when the evaluation recorded one, since methods often differ by less than the interval's width; sweeps over
`train.seed` also get the mean ± std over seeds, and `--compare A B` a paired comparison (report_compare.py).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .config_schema import ConfigError
from .evaluate import RESULTS
from .run_folder import write_text

METRICS = ("SA", "RA", "AA")
INTERVAL_COLUMNS = tuple(f"{m}_{side}" for m in METRICS for side in ("low", "high"))
NUMBER_COLUMNS = (*METRICS, *INTERVAL_COLUMNS, "n_test", "AA_n")  # measured, not settings: never grouped on
INTERVAL_NOTE = ("(low–high) = Wilson 95 % interval over the images counted: all n_test test images for SA and RA, "
                 "the AA_n AutoAttack images for AA.\n")


def _read_object(path: Path, fix: str) -> dict:
    """The JSON object in `path`; ConfigError naming the file and `fix` when it is damaged or not an object."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def sweep_points(root: Path) -> dict[str, dict]:
    """point folder → the values its grid point set, from the sweep.json files at or below `root`."""
    points = {}
    for path in sorted(root.rglob("sweep.json")):
        fix = "tools/submit.py --sweep writes it: move the damaged file away to report without the sweep's values"
        spec = _read_object(path, fix)
        try:
            for p in spec["points"]:
                points[str((path.parent / p["folder"]).resolve())] = p["swept"]
        except (KeyError, TypeError):
            raise ConfigError(f"{path} has no list of points with 'folder' and 'swept'; {fix}") from None
    return points


def interval_of(result: dict, metric: str) -> tuple[float | None, float | None]:
    """(low, high) in percent of `metric` from a results.json's "intervals"; (None, None) when the evaluation
    that wrote it predates intervals (or did not run that metric), so old runs still report."""
    intervals = result.get("intervals")
    entry = intervals.get(metric) if isinstance(intervals, dict) else None
    bounds = (entry.get("low"), entry.get("high")) if isinstance(entry, dict) else (None, None)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds):
        return float(bounds[0]), float(bounds[1])
    return None, None


def metric_cell(value, low: float | None = None, high: float | None = None) -> str:
    """`77.50 (72.89–81.58)`: an accuracy with its interval when there is one (the one formatter of the
    reports and of pipeline summaries)."""
    if value is None:
        return "—"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    text = f"{value:.2f}"
    return text if low is None or high is None else f"{text} ({low:.2f}–{high:.2f})"


def gather(root: str | Path) -> tuple[list[str], list[dict]]:
    """The column names and one row per results.json (sorted by folder). Rows also hold the interval bounds
    (INTERVAL_COLUMNS), which the markdown shows inside the metric cells and the CSV as columns of their own."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the run or sweep folder (e.g. runs/my-sweep)")
    points = sweep_points(root)
    swept = list(dict.fromkeys(k for values in points.values() for k in values))
    rows = []
    for path in sorted(root.rglob(RESULTS)):
        result = _read_object(path, "it is damaged (an evaluation killed while writing it, a copy cut short): "
                                    "move it away, or re-run the finetuning/evaluation that wrote it")
        folder = path.parent.resolve()
        values = next((v for p, v in points.items() if folder.is_relative_to(p)), {})
        row = {"run": str(folder.relative_to(root)) or ".", **{k: values.get(k, "") for k in swept},
               "method": result.get("method"), "finetune": str(result.get("finetune", "")).upper(),
               "dataset": result.get("dataset")}
        row.update({m: result.get(m) for m in METRICS})
        row["n_test"] = result.get("n_test")
        subset = result.get("aa_subset")  # AutoAttack on n of the test images only (eval.aa_n, aa_subset.py)
        row["AA_n"] = None if result.get("AA") is None else (subset["n"] if subset else row["n_test"])
        for m in METRICS:
            row[f"{m}_low"], row[f"{m}_high"] = interval_of(result, m)
        rows.append(row)
    columns = ["run", *swept, "method", "finetune", "dataset", *METRICS, "n_test", "AA_n"]
    return columns, rows


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def markdown(columns: list[str], rows: list[dict]) -> str:
    """A markdown table; metric cells carry their row's interval (`SA_low`, `SA_high`) when it has one."""
    def cell(row: dict, c: str) -> str:
        if c in METRICS:
            return metric_cell(row[c], row.get(f"{c}_low"), row.get(f"{c}_high"))
        return _cell(row[c])

    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if c in (*METRICS, "n_test", "AA_n") else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(columns: list[str], rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else (json.dumps(row[c]) if isinstance(row[c], (list, dict))
                                                     else row[c]) for c in columns])
    return out.getvalue()


def write_report(root: str | Path, compare: tuple[str, str] | None = None) -> tuple[str, int]:
    """Write report.md and report.csv into `root` (with seeds: report_seeds.csv; with `compare` = (A, B):
    report_compare.csv); returns the markdown (table, seeds, comparison) and the number of rows."""
    from .report_compare import compare_section, seeds_section  # builds on this module's tables

    columns, rows = gather(root)
    if not rows:
        raise FileNotFoundError(f"no {RESULTS} under {root}: no finetuning/evaluation has finished there yet")
    root = Path(root)
    text = markdown(columns, rows)
    if any(row[f"{m}_low"] is not None for row in rows for m in METRICS):
        text += f"\n{INTERVAL_NOTE}"
    outputs = {"report.csv": csv_text([*columns, *INTERVAL_COLUMNS], rows)}
    seeds = seeds_section(columns, rows)
    if seeds is not None:
        text += f"\n{seeds[0]}"
        outputs["report_seeds.csv"] = seeds[1]
    if compare is not None:
        section, table = compare_section(root, columns, rows, *compare)
        text += f"\n{section}"
        outputs["report_compare.csv"] = table
    write_text(f"# Results under {root.resolve()}\n\nAccuracies in % on the test split.\n\n{text}", root / "report.md")
    for name, content in outputs.items():
        write_text(content, root / name)
    return text, len(rows)
