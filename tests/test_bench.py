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


def test_loader_bench_small(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "loader", "--images", "64", "--size", "32",
                          "--batch-size", "16", "--warmup", "2", "--workers", "1", "--device", "cpu",
                          "--cache", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["format"] == "both" and report["ffcv_over_torchvision"] > 0
    assert [run["format"] for run in report["runs"]] == ["torchvision", "ffcv"]
    for run in report["runs"]:
        assert run["size"] == 32 and run["dataset_images"] == 64 and run["batch_size"] == 16
        assert run["images"] == 64 and run["batches"] == 4  # 4 timed batches after 2 warm-up ones: 2 epochs
        assert run["seconds"] > 0 and run["images_per_s"] > 0 and run["bytes"] > 0 and run["device"] == "cpu"
        assert run["write_seconds"] is not None and Path(run["data"]).exists()
    assert "ffcv / torchvision:" in res.stdout
    assert {p.name for p in (tmp_path / "loader-64-32-0").iterdir()} >= {"images.npy", "labels.npy", "data.beton"}
