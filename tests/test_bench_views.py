"""`tools/bench.py views`: the views of an AdvCL step timed, with their operator count per batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_views_bench_small(tmp_path):
    out = tmp_path / "views.json"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "views", "--batch", "4", "8",
                          "--size", "16", "--steps", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report
    assert report["bench"] == "views" and report["device"] == "cpu" and report["fused"]
    assert list(report["runs"]) == ["4", "8"]
    ops = [run["operators"] for run in report["runs"].values()]
    assert ops[0] == ops[1] and 100 < ops[0] <= 400  # views made together: as many operators at any batch size
    for batch, run in report["runs"].items():
        assert run["ms_per_batch"] > 0 and len(run["batch_ms"]) == 1
        assert run["images_per_s"] == pytest.approx(int(batch) / run["ms_per_batch"] * 1e3)
    assert f"| 8 | {report['runs']['8']['ms_per_batch']:.2f} |" in res.stdout
