"""Shared output of the benchmarks: the JSON report (checked writable before timing), the core count."""
from __future__ import annotations

import json
import os
from pathlib import Path


def cores() -> int:
    return len(os.sched_getaffinity(0))


def check_json(path: str | None) -> None:
    """Fail before minutes of timing, not after, when the --json file's folder does not exist."""
    if path and not Path(path).resolve().parent.is_dir():
        raise SystemExit(f"--json {path}: its folder does not exist")


def write_report(report: dict, json_path: str | None) -> None:
    """The report as one JSON line: printed last, and written to `json_path` when given."""
    line = json.dumps(report)
    if json_path:
        Path(json_path).write_text(line + "\n")
    print(line)
