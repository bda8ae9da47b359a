"""tools/gpu_check.sh, the one prepared GPU check, runs every section end to end at toy sizes on the CPU.

It is run on a GPU machine once, with no second try to spare: every section must be known to work first.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
SECTIONS = {"env": "env", "step-r18": "step", "precision": "precision", "pretrain": "pretrain", "kmeans": "kmeans",
            "views-32": "views", "loader-32": "loader", "step-r50": "step", "loader-256": "loader",
            "views-224": "views", "step-r18-compile": "step"}


def run_check(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    (tmp_path / "no-wheels").mkdir()
    res = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path / "out"),
                          "--wheels", str(tmp_path / "no-wheels"), *flags], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    out = tmp_path / "out"
    return res, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.integration
def test_gpu_check_tiny_on_cpu(tmp_path):
    res, report, md = run_check(tmp_path)
    sections = report["sections"]
    assert res.returncode == 0, "\n".join(f"{n}: {s['status']}" for n, s in sections.items()) + res.stdout[-3000:]
    assert report["failed"] == [] and report["device"] == "cpu" and report["tiny"]
    # FFCV is installed wherever the tests run (make install), so no row is left out for it
    assert list(sections) == ["wheels", *SECTIONS], list(sections)
    assert sections["wheels"]["status"] == "not run" and "no wheels" in sections["wheels"]["reason"]
    for name, bench in SECTIONS.items():
        s = sections[name]
        assert s["status"] == "ok" and s["report"]["bench"] == bench, (name, s["status"])
        assert f"| {name} | ok |" in md and f"## {name}: ok" in md
    env = sections["env"]["report"]
    assert env["missing"] == {} and "omegaconf" in env["versions"] and "ffcv" in env["versions"]
    assert list(sections["step-r18"]["report"]["modes"]) == ["reference", "fp32", "bf16", "bf16-unfused", "supervised"]
    compiled = sections["step-r18-compile"]["report"]["modes"]
    assert list(compiled) == ["bf16", "bf16-compile"] and "error" not in compiled["bf16-compile"]
    assert sections["step-r50"]["report"]["args"]["arch"] == "resnet50"
    for name in ("loader-32", "loader-256"):
        assert [run["format"] for run in sections[name]["report"]["runs"]] == ["torchvision", "ffcv"]
    precision = sections["precision"]["report"]
    assert set(precision["attacks"]) == {"delta", "delta_ce"} and precision["pgd20"]["images"] == 32
    assert sections["pretrain"]["report"]["steps"] == 5 and sections["pretrain"]["report"]["images_per_s"] > 0
    assert "| mode | images/s |" in md  # each bench's own table follows the summary
    assert "== step-r18-compile: exit 0" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_gpu_check_records_what_did_not_run(tmp_path):
    """With no time left every section is recorded as out of time, the report is still written, and the exit
    status says the check failed."""
    res, report, md = run_check(tmp_path, "--budget", "0")
    assert res.returncode == 1
    assert set(report["failed"]) == set(SECTIONS) and report["sections"]["wheels"]["status"] == "not run"
    assert all(report["sections"][name]["status"] == "out of time" for name in SECTIONS)
    assert "| step-r18 | out of time |" in md
