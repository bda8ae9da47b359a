"""tools/bench.py runs end to end at small sizes and reports what it measured as its last line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advcl_dist.bench.reference import reference_step
from advcl_dist.bench.step import make_setup
from advcl_dist.rng import StepRandom

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


def test_step_bench_small(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "step", "--width", "4", "--size", "32",
                          "--batch", "8", "--steps", "2", "--warmup", "1", "--attack-steps", "2", "--device", "cpu",
                          "--json", str(tmp_path / "step.json")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny ops: threads only wait on each other
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "step.json").read_text())
    assert report["bench"] == "step" and report["args"]["batch"] == 8 and report["config"]["steps"] == 2
    runs = report["modes"]
    assert list(runs) == ["reference", "fp32", "bf16", "supervised"]
    for run in runs.values():
        assert run["images_per_s"] > 0 and run["flops_per_image"] > 0 and len(run["step_ms"]) == 2
    # the reference re-forwards the three clean views at every PGD step; ours projects them once
    assert runs["reference"]["flops_per_image"] > runs["fp32"]["flops_per_image"]
    assert runs["fp32"]["flops_per_image"] == runs["bf16"]["flops_per_image"]
    assert runs["supervised"]["precision"] == "fp32"  # on CPU
    assert set(report["derived"]["advcl_efficiency"]) == {"fp32", "bf16"}
    assert "| reference |" in res.stdout and "AdvCL efficiency" in res.stdout


def test_reference_step_loss_and_gradients_equal_ours():
    """One forward per view (the authors) and our batched forward with per-view BN statistics compute the
    same step: same views, same random starts, same loss and the same gradients (train-mode BN)."""
    setup = make_setup(8, "resnet18", 4, 32, attack_steps=3, seed=0, device=torch.device("cpu"))
    ours_model, reference_model = setup.fresh_model(0), setup.fresh_model(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: on a busy machine more threads only wait on each other
    try:
        out = setup.method.training_step(ours_model, setup.images, setup.indices, StepRandom("cpu", 5).reseed(2))
        loss = reference_step(reference_model, setup.images, setup.pseudo, setup.cfg, StepRandom("cpu", 5).reseed(2))
        out.loss.backward()
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    assert "loss_ce" in out.metrics
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-4)
    ours, reference = dict(ours_model.named_parameters()), dict(reference_model.named_parameters())
    scale = max(p.grad.abs().max().item() for p in reference.values())
    # atol: the bias before the projector's BN has gradient 0 up to rounding
    differ = [name for name, p in reference.items() if not torch.allclose(ours[name].grad, p.grad, 1e-4, 1e-5 * scale)]
    assert not differ
