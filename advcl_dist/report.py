"""One table of every results.json under a folder: a pipeline, a sweep, or a whole runs/ tree.

For a sweep (a `sweep.json` written by tools/submit.py), each row also shows the values its point
set, so a grid over `pseudo.ks` reads as the K ablation it is.
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


def gather(root: str | Path) -> tuple[list[str], list[dict]]:
    """The column names and one row per results.json (sorted by folder)."""
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
        subset = result.get("aa_subset")  # AutoAttack on the first n test images only (eval.aa_n)
        row["AA_n"] = subset["n"] if subset else (None if result.get("AA") is None else row["n_test"])
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
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if c in (*METRICS, "n_test", "AA_n") else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(columns: list[str], rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else (json.dumps(row[c]) if isinstance(row[c], (list, dict))
                                                     else row[c]) for c in columns])
    return out.getvalue()


def write_report(root: str | Path) -> tuple[str, int]:
    """Write report.md and report.csv into `root`; returns the markdown and the number of rows."""
    columns, rows = gather(root)
    if not rows:
        raise FileNotFoundError(f"no {RESULTS} under {root}: no finetuning/evaluation has finished there yet")
    table = markdown(columns, rows)
    write_text(f"# Results under {Path(root).resolve()}\n\nAccuracies in % on the test split.\n\n{table}",
               Path(root) / "report.md")
    write_text(csv_text(columns, rows), Path(root) / "report.csv")
    return table, len(rows)
