"""tools/bench.py runs end to end at small sizes and reports what it measured as its last line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from advcl_dist.bench.profile import count_costs
from advcl_dist.bench.reference import reference_step
from advcl_dist.bench.step import make_setup, make_step
from advcl_dist.data.augment import to_float
from advcl_dist.engine.objective import StepContext
from advcl_dist.rng import StepRandom

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_kmeans_bench_small(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "kmeans", "--rows", "3000", "--dim", "8",
                          "--centres", "20", "--ks", "2", "10", "--procs", "1", "2", "--cache", str(tmp_path),
                          "--json", str(tmp_path / "kmeans.json")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "kmeans.json").read_text())
    assert report["bench"] == "kmeans" and report["rows"] == 3000 and report["ks"] == [2, 10]
    assert set(report["runs"]) == {"ours-1p", "ours-2p", "faiss", "faiss-sampled", "faiss-our-start", "sklearn"}
    for run in report["runs"].values():
        assert run["seconds"] > 0 and set(run["stats"]) == {"2", "10"}
        for k in ("2", "10"):
            assert sum(run["stats"][k]["sizes"]) == 3000 and len(run["stats"][k]["sizes"]) == int(k)
    ours1, ours2 = (report["runs"][f"ours-{p}p"]["stats"] for p in (1, 2))
    for k in ("2", "10"):  # the same clustering on 1 and 2 processes
        assert ours1[k]["inertia"] == ours2[k]["inertia"] and ours1[k]["sizes"] == ours2[k]["sizes"]
    # faiss trains on every row (no subsampling) unless it is the labelled default, and ends near ours
    faiss_run, sampled = report["runs"]["faiss"]["stats"], report["runs"]["faiss-sampled"]["stats"]
    assert [faiss_run[k]["rows_trained"] for k in ("2", "10")] == [3000, 3000]
    assert [sampled[k]["rows_trained"] for k in ("2", "10")] == [512, 2560]
    for k in ("2", "10"):
        assert ours1[k]["inertia"] == pytest.approx(faiss_run[k]["inertia"], rel=0.03)
        relative = ours1[k]["inertia"] / faiss_run[k]["inertia"] - 1
        assert report["ours_1p_vs_faiss"]["inertia"][k] == pytest.approx(relative)
    assert report["ours_1p_vs_faiss"]["time_ratio"] > 0
    assert report["runs"]["sklearn"]["stats"]["10"]["inertia"] > 0
    assert "| ours-2p |" in res.stdout and "| inertia vs faiss |" in res.stdout
    assert len(list(tmp_path.glob("kmeans-3000x8-*.npy"))) == 1


@pytest.mark.integration
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


@pytest.mark.integration
def test_step_bench_per_method_counts_encoder_passes(tmp_path):
    """`step --method`: SimCLR pays 2 views × (forward + backward = 3 passes) = 6 forward-equivalents per image
    (a little less: the first convolution needs no input gradient); supervised AT pays its PGD-S (a forward and
    an input-gradient backward per step) plus one training step: 2·S + 3."""
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "step", "--method", "simclr",
                          "supervised_at", "--width", "4", "--batch", "8", "--steps", "1", "--warmup", "0",
                          "--device", "cpu", "--json", str(tmp_path / "m.json")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "m.json").read_text())
    runs = report["methods"]
    assert list(runs) == ["simclr", "supervised_at"] and report["bench"] == "step-methods"
    assert 5.8 < runs["simclr"]["forward_equivalents"] <= 6.0
    steps = 10  # attack.supervised_steps
    assert 2 * steps + 2.5 < runs["supervised_at"]["forward_equivalents"] <= 2 * steps + 3
    assert all(r["images_per_s"] > 0 and r["host_syncs"] == [] for r in runs.values())
    assert "| simclr | simclr | fp32 |" in res.stdout


def test_step_bench_small(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "step", "--width", "4", "--size", "32",
                          "--batch", "8", "--steps", "2", "--warmup", "1", "--attack-steps", "2", "--device", "cpu",
                          "--json", str(tmp_path / "step.json"), "--profile", str(tmp_path / "profile")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny ops: threads only wait on each other
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "step.json").read_text())
    assert report["bench"] == "step" and report["args"]["batch"] == 8 and report["config"]["steps"] == 2
    runs = report["modes"]
    assert list(runs) == ["reference", "fp32", "bf16", "bf16-unfused", "supervised"]
    for mode, run in runs.items():
        assert run["images_per_s"] > 0 and run["flops_per_image"] > 0 and len(run["step_ms"]) == 2
        assert run["host_syncs"] == []
        # --profile: a Chrome trace and an op table per mode, and the time split by kind of operation
        profile = run["profile"]
        assert json.loads((tmp_path / "profile" / f"{mode}.trace.json").read_text())["traceEvents"]
        assert "aten::" in (tmp_path / "profile" / f"{mode}.ops.txt").read_text()
        assert sum(profile["share"].values()) == pytest.approx(1.0)
        assert profile["share"]["convolution"] > 0.1  # a ResNet step, even at width 4
    assert {"advcl/views", "advcl/attacks", "advcl/training_forward"} <= set(runs["fp32"]["profile"]["ranges"])
    assert "Where the time goes" in res.stdout and "host-synchronising ops per step: reference 0" in res.stdout
    # the reference re-forwards the three clean views at every PGD step; ours projects them once
    assert runs["reference"]["flops_per_image"] > runs["fp32"]["flops_per_image"]
    assert runs["fp32"]["flops_per_image"] == runs["bf16"]["flops_per_image"]
    # unfused: no gradient through the heads of rows that no attack loss uses
    assert runs["bf16-unfused"]["flops_per_image"] < runs["bf16"]["flops_per_image"]
    assert runs["supervised"]["precision"] == "fp32"  # on CPU
    assert set(report["derived"]["advcl_efficiency"]) == {"fp32", "bf16", "bf16-unfused"}
    assert "| reference |" in res.stdout and "AdvCL efficiency" in res.stdout


def test_reference_step_loss_and_gradients_equal_ours():
    """One forward per view (the authors) and our batched forward with per-view BN statistics compute the
    same step: same views, same random starts, same loss and the same gradients (train-mode BN)."""
    setup = make_setup(8, "resnet18", 4, 32, attack_steps=3, seed=0, device=torch.device("cpu"))
    ours_model, reference_model = setup.fresh_model(0), setup.fresh_model(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: on a busy machine more threads only wait on each other
    try:
        out = setup.method.training_step(StepContext.of_batch(ours_model, setup.images, setup.indices,
                                                              StepRandom("cpu", 5).reseed(2)))
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


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_reference_costs_exactly_the_clean_views_re_forwarded_at_each_later_pgd_step():
    """FLOPs (matmuls, convolutions) of the authors' step = ours + the 3 clean views forwarded again at each
    PGD step after the first, − what our batched forwards spend on rows a loss does not use: the gradient
    through the projection head of the δ_ce rows and the pseudo heads of the δ rows at every PGD step, and
    in the training backward the pseudo heads of the four contrastive views (weights and input) and the
    projection head of the δ_ce view. Each part is counted on its own, on plain forwards."""
    steps, b = 3, 8
    setup = make_setup(b, "resnet18", 4, 32, attack_steps=steps, seed=0, device=torch.device("cpu"))
    ours, reference = (count_costs(make_step(mode, setup, 0)[0], 0)[0] for mode in ("fp32", "reference"))
    model = setup.fresh_model(0)
    x = to_float(setup.images)
    forward = _flops(lambda: model(x, (("normal", b),)))
    h = model.encoder(x)
    proj = _flops(lambda: model.projector(h))
    heads = _flops(lambda: [head(h) for head in model.pseudo_heads])
    # per PGD step, input gradients only (a linear layer's costs what its forward does); in the training
    # backward weight and input gradients (twice the forward) of the unused rows
    unused = steps * (proj + heads) + 2 * (4 * heads + proj)
    assert proj > 0 and heads > 0
    assert reference - ours == 3 * (steps - 1) * forward - unused


def test_step_bench_refuses_an_output_it_cannot_write_before_timing(tmp_path):
    (tmp_path / "file").write_text("")
    for option, value, message in (("--json", tmp_path / "missing" / "step.json", "its folder does not exist"),
                                   ("--profile", tmp_path / "file" / "prof", "cannot create the folder")):
        res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "step", "--device", "cpu",
                              option, str(value)], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and f"{option} {value}: {message}" in res.stderr
        assert "ms/step" not in res.stdout  # nothing was timed


@pytest.mark.integration
def test_eval_bench_small(tmp_path):
    # A classifier better than chance (~90% at 60 steps) and ε = 0.1: APGD-CE breaks every image, so AutoAttack
    # skips its slow attacks (a robust image would cost thousands of Square queries). One thread per process:
    # tiny ops, and on a busy machine two threads of one process mostly wait for each other.
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "eval", "--procs", "1", "2",
                          "--threads-total", "1", "--width", "4", "--train-steps", "60", "--images", "40",
                          "--aa-images", "8", "--batch", "20", "--aa-batch", "4", "--pgd-steps", "2", "--eps", "0.1",
                          "--cache", str(tmp_path), "--json", str(tmp_path / "eval.json")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "eval.json").read_text())
    assert report["bench"] == "eval" and report["threads_total"] == 1 and report["reference_procs"] == 1
    assert report["settings"]["images"] == 40 and report["settings"]["aa_images"] == 8
    assert report["classifier"]["train_steps"] == 60 and 0 <= report["classifier"]["test_accuracy"] <= 100
    assert list(report["runs"]) == ["1p", "2p"]
    for procs, run in zip((1, 2), report["runs"].values()):
        assert (run["procs"], run["threads"]) == (procs, 1)  # at least one thread per process
        assert run["pgd_images_per_s"] > 0 and run["aa_images_per_s"] > 0 and run["wall_s"] >= run["eval_s"] > 0
        assert len(run["busy_pgd_s"]) == len(run["busy_aa_s"]) == procs
        assert len(run["flags"]["pgd"]) == 2 and len(run["flags"]["pgd"][0]) == 40 and len(run["flags"]["aa"]) == 8
        assert run["same_flags_as_1p"] is True  # the evaluation does not depend on the number of ranks
    assert "| 2 × 1 |" in res.stdout and "flags = 1 process(es)" in res.stdout
    assert len(list(tmp_path.glob("eval-classifier-r18w4-ce60-s0.pt"))) == 1


@pytest.mark.integration
def test_finetune_bench_small(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "finetune", "--modes", "slf", "aff",
                          "--width", "4", "--batch", "32", "--steps", "2", "--warmup", "1", "--attack-steps", "2",
                          "--cache", str(tmp_path), "--json", str(tmp_path / "finetune.json")],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny ops: threads only wait on each other
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "finetune.json").read_text())
    assert report["bench"] == "finetune" and report["args"]["batch"] == 32 and report["config"]["attack_steps"] == 2
    assert list(report["modes"]) == ["slf", "aff"]
    for run in report["modes"].values():
        assert run["images_per_s"] > 0 and len(run["step_ms"]) == 2 and run["load_ms_per_batch"] >= 0
        assert run["steps_per_epoch"] == 1437 // 32
    assert Path(report["pretrained"]) == tmp_path / "ft-pretrain-advcl-r18w4-s0" / "checkpoint.pt"
    assert Path(report["pretrained"]).is_file() and "| aff |" in res.stdout
