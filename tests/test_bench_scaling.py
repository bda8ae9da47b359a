"""The scaling model's formulas against hand-computed numbers, its byte counts against the real model and
DDP, and `tools/bench.py scaling` end to end on 1 and 2 gloo processes."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from advcl_dist.bench import scaling_model as sm
from advcl_dist.distributed import distributed_session, run_local_ranks
from advcl_dist.models import build_model

ROOT = Path(__file__).resolve().parents[1]
KS = (2, 10, 50, 100, 500)  # the schema's pseudo.ks


def test_ring_times_match_the_textbook_formula_by_hand():
    # 100 MB over 4 ranks at 10 GB/s, 5 µs per hop, 10 µs base: 10 + 2·3·5 µs + 2·3/4 · 10 ms
    assert sm.ring_s("allreduce", 100e6, 4, 10e9, hop_s=5e-6, base_s=10e-6) == pytest.approx(0.01504)
    assert sm.ring_s("allgather", 100e6, 4, 10e9, hop_s=5e-6) == pytest.approx(3 * 5e-6 + 0.0075)
    assert sm.ring_s("broadcast", 100e6, 4, 10e9) == pytest.approx(0.01)
    assert sm.ring_s("allreduce", 100e6, 1, 10e9, hop_s=5e-6) == 0.0


def test_nccl_model_by_hand():
    # One node of 8 on NVLink (450 GB/s), 450 MB: ring Simple, 8.4 + 14 × 3.4 µs + 2·7/8 · 1 ms.
    assert sm.nccl_s("allreduce", 450e6, 8, 50e9) == pytest.approx(56e-6 + 1.75e-3)
    # Two nodes (16 GPUs) on 50 GB/s, 50 MB: 2 of the 30 ring hops cross the network.
    ring = (8.4 + 28 * 3.4 + 2 * 9.6) * 1e-6 + 2 * 15 / 16 * 50e6 / 50e9
    tree = 2 * (7 * 28 + 1 * 50) * 1e-6 + 2 * 50e6 / (0.9 * 50e9)
    assert sm.nccl_s("allreduce", 50e6, 16, 50e9, "ring") == pytest.approx(ring)
    assert sm.nccl_s("allreduce", 50e6, 16, 50e9, "tree") == pytest.approx(tree)
    # 1 kB: latency-bound, so the LL protocol wins (NVLink hops × 1.8 across nodes).
    ll = (3.6 + 28 * 0.47 * 1.8 + 2 * 2.7) * 1e-6 + 4 * 2 * 15 / 16 * 1e3 / 50e9
    assert sm.nccl_s("allreduce", 1e3, 16, 50e9, "ring") == pytest.approx(ll)


def test_ddp_bucket_rule_by_hand():
    mb = 1 << 20
    # first bucket closes at >= 1 MiB, the next ones at >= 25 MiB; the rest is the last bucket
    sizes = [600_000, 600_000, 10 * mb, 20 * mb, 5 * mb]
    assert sm.ddp_buckets(sizes) == [1_200_000, 30 * mb, 5 * mb]
    assert sm.ddp_buckets([mb, mb]) == [mb, mb]  # a bucket that reaches its cap exactly is closed
    assert sm.ddp_buckets([4 * mb]) == [4 * mb]


def test_fit_recovers_the_hop_and_bandwidth_it_was_made_with():
    samples = [(n, b, sm.ring_s("allreduce", b, n, 2e9, hop_s=40e-6)) for n in (2, 3) for b in (4096, 1 << 20, 1 << 24)]
    hop, bw = sm.fit_ring(samples)
    assert hop == pytest.approx(40e-6, rel=1e-6) and bw == pytest.approx(2e9, rel=1e-6)


def test_gradient_bytes_are_every_trainable_parameter_of_the_advcl_model():
    w = sm.workload(64)
    model = build_model("resnet18", 64, ("normal", "pgd", "pgd_ce"), 128, None, KS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(w.buckets) == sum(p.numel() * 4 for p in trainable) == 4 * w.params
    # By hand: ResNet-18 (CIFAR) 11,173,962 less its fc (5,130), + 2 more BN branches of 9,600 affine
    # parameters each; projection 512→512→128 with a BN; one linear head per K.
    heads = sum(512 * k + k for k in KS)
    assert w.params == 11_173_962 - 5_130 + 2 * 9_600 + (512 * 512 + 512 + 2 * 512 + 512 * 128 + 128) + heads
    # BN running statistics are buffers, not gradients: DDP broadcasts them, it does not all-reduce them.
    assert w.buffer_bytes == sum(b.numel() * b.element_size() for b in model.buffers()) > 0
    assert [round(b / sm.MIB, 2) for b in w.buckets] == [1.17, 28.92, 15.13]


def test_one_gpu_at_the_reference_batch_is_the_assumed_rate_and_faster_fabrics_help():
    w, dev = sm.workload(16), sm.Device()
    one = sm.step_terms(dev, w, 1, 512, sm.FABRICS["100 Gb/s"])
    assert one["step"] == pytest.approx(512 / 4600) and one["efficiency"] == pytest.approx(1.0)
    slow, fast = (sm.step_terms(dev, w, 32, 512, sm.FABRICS[f]) for f in ("100 Gb/s", "400 Gb/s"))
    assert fast["embed"] < slow["embed"] and fast["grad_comm"] < slow["grad_comm"]
    assert slow["loss_extra"] == fast["loss_extra"] > 0  # the global-batch loss grows with the GPUs
    fixed = sm.step_terms(dev, w, 32, 16, sm.FABRICS["400 Gb/s"])
    assert fixed["compute"] == pytest.approx(sm.OPS_PER_STEP * 5e-6)  # 16 per GPU: the launch floor
    both = sm.step_terms(dev, w, 32, 512, sm.FABRICS["100 Gb/s"], clean_once=True)
    assert both["embed"] < slow["embed"] and math.isclose(both["compute"], slow["compute"])


def test_the_gathers_backward_is_a_reduce_scatter_as_in_the_code():
    """_GatherRows.backward reduce-scatters: the model's default; the all-reduce it replaced is the reference."""
    w, dev, bw = sm.workload(64), sm.Device(), sm.FABRICS["100 Gb/s"]
    now, before = (sm.step_terms(dev, w, 32, 512, bw, reduce_scatter=rs) for rs in (True, False))
    emb = sm.embed_bytes(32 * 512, w.embed_dim)
    one_gather = sm.nccl_s("allgather", emb, 32, bw) + sm.nccl_s("reduce_scatter", emb, 32, bw)
    assert now["embed"] == pytest.approx(6 * one_gather)
    assert now["embed"] == sm.step_terms(dev, w, 32, 512, bw)["embed"] < before["embed"]
    # ring: an all-gather and a reduce-scatter of the same bytes take the same time, an all-reduce twice it
    assert sm.ring_s("reduce_scatter", 1e6, 4, 1e9) == sm.ring_s("allgather", 1e6, 4, 1e9) == 0.5 * sm.ring_s(
        "allreduce", 1e6, 4, 1e9)
    table = sm.changes_table(dev, w)
    assert "| before: all-reduce in the gather's backward, DDP |" in table and "+ reduce-scatter" not in table


def _ddp_buckets(width):
    with distributed_session("cpu"):
        from advcl_dist.bench.scaling import ddp_bucket_bytes

        return ddp_bucket_bytes(width)[0]


@pytest.mark.distributed
def test_ddp_reduces_the_buckets_the_model_predicts():
    """Width 16 makes two buckets: DDP's own (comm hook, after its rebuild) are the model's, in order."""
    buckets = run_local_ranks(2, _ddp_buckets, 16)
    assert buckets[0] == buckets[1] == list(sm.workload(16).buckets) and len(buckets[0]) == 2


@pytest.mark.distributed
def test_scaling_bench_small(tmp_path):
    out = tmp_path / "scaling.json"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "scaling", "--procs", "1", "2",
                          "--width", "4", "--batch", "16", "--repeats", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert report["bench"] == "scaling" and set(report["runs"]) == {"1p", "2p"}
    model = build_model("resnet18", 4, ("normal", "pgd", "pgd_ce"), 128, None, KS)
    grad_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    two = report["runs"]["2p"]
    assert sum(two["ddp_bucket_bytes"]) == report["model"]["grad_bytes"] == grad_bytes
    assert two["ddp_bucket_bytes"] == report["model"]["ddp_bucket_bytes"]
    assert two["gather_bytes"] == 16 * 4 * 128 * 4  # the global batch's 4 views × 128 dims, fp32
    assert set(two["collectives"]) == {"grad", "gather", "scatter", "buffers"}
    for c in two["collectives"].values():
        assert c["measured_s"] > 0 and c["model_own_s"] > 0
        assert c["model_own_s"] == pytest.approx(c["model_joint_s"])  # one process count with a sweep: one fit
    assert all(c["model_own_s"] == c["model_joint_s"] == 0 for c in report["runs"]["1p"]["collectives"].values())
    assert report["fit"]["bus_bytes_per_s"] > 0 and report["fit"]["samples"] == len(two["sweep"]) >= 2
    at_8, at_16 = (o["kernels"] for o in report["ops_per_step"])
    assert at_8 > 1000 and abs(at_16 - at_8) <= 0.01 * at_8  # launches per step do not grow with the batch
    assert "| 2 | gradient all-reduce (DDP buckets) |" in res.stdout
    assert "| 2 | its backward reduce-scatter |" in res.stdout and "backward all-reduce" not in res.stdout
    fit = two["fit"]  # the backward is predicted as the reduce-scatter it is, with the fitted constants
    assert two["collectives"]["scatter"]["model_own_s"] == pytest.approx(
        sm.ring_s("reduce_scatter", two["gather_bytes"], 2, fit["bus_bytes_per_s"], fit["hop_s"]))
