"""tools/bench.py runs end to end at small sizes and reports what it measured as its last line."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kmeans_bench_small(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "kmeans", "--rows", "3000", "--dim", "8",
                          "--centres", "6", "--ks", "2", "6", "--iters", "5", "--procs", "1", "2",
                          "--cache", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["bench"] == "kmeans" and report["rows"] == 3000 and report["ks"] == [2, 6]
    assert set(report["runs"]) == {"ours-1p", "ours-2p", "sklearn"}
    for run in report["runs"].values():
        assert run["seconds"] > 0 and set(run["stats"]) == {"2", "6"}
    ours1, ours2 = (report["runs"][f"ours-{p}p"]["stats"] for p in (1, 2))
    for k in ("2", "6"):  # the same clustering on 1 and 2 processes
        assert ours1[k]["inertia"] == ours2[k]["inertia"] and ours1[k]["sizes"] == ours2[k]["sizes"]
        assert sum(ours1[k]["sizes"]) == 3000
    assert report["runs"]["sklearn"]["stats"]["6"]["inertia"] > 0
    assert "| ours-2p |" in res.stdout
    assert len(list(tmp_path.glob("kmeans-3000x8-*.npy"))) == 1
