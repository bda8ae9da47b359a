"""A paper model of data-parallel AdvCL steps: what each rank computes, moves and waits for, per step.

Pure functions, shared by `tools/bench.py scaling` (which checks the communication terms against gloo on
this machine) and by this module's command line, which prints the tables of docs/scaling.md:

    python -m advcl_dist.bench.scaling_model --images-per-s 4600

Every number below that is not computed from our model is an assumption or a published constant, named
where it is defined; docs/scaling.md lists them. Times are seconds, sizes bytes, bandwidths bytes/s.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

MIB = 1 << 20
DDP_FIRST_BUCKET = 1 * MIB  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET = 25 * MIB  # DistributedDataParallel(bucket_cap_mb=None) → 25 MiB
GPUS_PER_NODE = 8
NVLINK = 450e9  # H200 NVLink 4: 18 links × 25 GB/s per direction (line rate)
FABRICS = {"100 Gb/s": 12.5e9, "200 Gb/s": 25e9, "400 Gb/s": 50e9}  # one NIC per GPU, line rate
CONTRAST_VIEWS = 4  # x+δ, t1, t2, x_h: the rows of each sample in the contrastive loss (methods/advcl.py)
# Dispatched ATen ops of one bf16 AdvCL step that run a kernel (views and allocations excluded, optimizer not
# included), counted by `tools/bench.py scaling` (its ops_per_step): the same at batch 8, 16 and 32 (CPU,
# width 4); 3,543-3,549 in earlier runs while the views code changed. A proxy for the kernels a step launches.
OPS_PER_STEP = 3534


@dataclass(frozen=True)
class Protocol:
    """NCCL's cost constants of one (algorithm, protocol): µs latencies and the share of the bus bandwidth."""

    base: float
    nvlink_hop: float
    net_hop: float
    bw_share: float


# NVIDIA/nccl src/graph/tuning.cc (baseLat, hwLat; LL bus bandwidth ÷4 ring, ÷3.8 tree; trees × 0.9).
# NCCL picks the fastest of them per call; NVLS/CollNet and the tree correction factors are left out.
NCCL = {("ring", "LL"): Protocol(3.6, 0.47, 2.7, 1 / 4), ("ring", "Simple"): Protocol(8.4, 3.4, 9.6, 1.0),
        ("tree", "LL"): Protocol(4.4, 0.52, 5.0, 0.9 / 3.8), ("tree", "Simple"): Protocol(0.0, 28.0, 50.0, 0.9)}
HOPS = {"allreduce": 2, "allgather": 1, "reduce_scatter": 1, "broadcast": 1}  # ring steps per (n − 1)


def ring_s(kind: str, nbytes: float, n: int, bus_bw: float, hop_s: float = 0.0, base_s: float = 0.0) -> float:
    """Textbook ring: base + k(n−1)·hop + k(n−1)/n·bytes/bus_bw, k = 2 for all-reduce, 1 for all-gather and
    reduce-scatter (bytes: the gathered / reduced tensor); a broadcast pipelines all bytes down the ring."""
    if n <= 1:
        return 0.0
    k = HOPS[kind]
    share = 1.0 if kind == "broadcast" else k * (n - 1) / n
    return base_s + k * (n - 1) * hop_s + share * nbytes / bus_bw


def nccl_s(kind: str, nbytes: float, n: int, fabric_bw: float, algo: str = "ring",
           per_node: int = GPUS_PER_NODE, nvlink_bw: float = NVLINK) -> float:
    """NCCL's own time model (tuning.cc), fastest protocol: rings cross 2(nodes−1) (all-reduce) or nodes−1
    network hops, the rest NVLink; trees climb log2(nodes) network levels and per_node−1 NVLink ones."""
    if n <= 1:
        return 0.0
    nodes, local = math.ceil(n / per_node), min(n, per_node)
    bw = nvlink_bw if nodes == 1 else min(nvlink_bw, fabric_bw)
    k = HOPS[kind]
    best = math.inf
    for proto in ("LL", "Simple"):
        if algo == "tree" and kind != "allreduce":
            raise ValueError("NCCL runs trees for all-reduce only")
        c = NCCL[(algo, proto)]
        intra = c.nvlink_hop * (1.8 if nodes > 1 and proto == "LL" else 1.0)
        if algo == "ring":
            inter_hops = k * (nodes - 1)
            lat = c.base + (k * (n - 1) - inter_hops) * intra + inter_hops * c.net_hop
            t = lat * 1e-6 + ring_s(kind, nbytes, n, bw * c.bw_share)
        else:
            lat = c.base + 2 * ((local - 1) * intra + int(math.log2(nodes)) * c.net_hop)
            t = lat * 1e-6 + 2 * nbytes / (bw * c.bw_share)
        best = min(best, t)
    return best


def ddp_buckets(tensor_bytes: list[int], first_cap: int = DDP_FIRST_BUCKET, cap: int = DDP_BUCKET) -> list[int]:
    """DDP's bucket sizes for gradients in the order they become ready (reducer: a bucket closes once it
    holds >= its cap; the first cap is 1 MiB, then 25 MiB): the all-reduces of one backward, in order."""
    buckets, size = [], 0
    for nbytes in tensor_bytes:
        size += nbytes
        if size >= (first_cap if not buckets else cap):
            buckets.append(size)
            size = 0
    return buckets + ([size] if size else [])


def embed_bytes(global_batch: int, dim: int, views: int = CONTRAST_VIEWS, itemsize: int = 4) -> int:
    """Bytes of the gathered contrast set: every rank's views × rows × dim, fp32 (losses.py)."""
    return global_batch * views * dim * itemsize


@dataclass(frozen=True)
class Workload:
    """What one step of our AdvCL moves, from the model and the config (`workload`)."""

    params: int  # parameters with requires_grad: DDP all-reduces each one's fp32 gradient
    grad_tensors: tuple[int, ...]  # their gradients' bytes in the order they become ready (reverse registration)
    buffer_bytes: int  # BN running stats of every branch: broadcast from rank 0 at each DDP forward
    embed_dim: int  # projection width
    gathers: int  # global-batch losses per step: attack.steps PGD steps + the training forward
    bucket_cap: int = DDP_BUCKET  # DistributedDataParallel(bucket_cap_mb=...) in bytes

    @property
    def buckets(self) -> tuple[int, ...]:
        """DDP bucket bytes, in the order they are all-reduced (checked against DDP by the bench)."""
        return tuple(ddp_buckets(list(self.grad_tensors), cap=self.bucket_cap))


@dataclass(frozen=True)
class Device:
    """One GPU's side of the step: ASSUMED numbers, each replaceable from the command line."""

    images_per_s: float = 4600.0  # ASSUMED: the project's H200 target, ResNet-18 32 px, batch 512, one GPU
    ref_batch: int = 512  # the batch that rate is for
    backward_share: float = 10 / 38  # FLOP model: 38 forward-equivalents per image, 10 of them the training backward
    ops_per_step: int = OPS_PER_STEP  # kernel launches per step, whatever the batch (counted, see OPS_PER_STEP)
    host_s_per_op: float = 5e-6  # ASSUMED eager PyTorch host cost per launched op (dispatch + autograd + launch)
    fp32_flops: float = 67e12  # H200 datasheet FP32 (the loss runs fp32, TF32 off for matmuls)
    hbm_bw: float = 4.8e12  # H200 datasheet HBM3e
    loss_passes: float = 30  # ESTIMATE: fp32 passes over the logits per loss, forward + backward (losses.py)


def workload(width: int = 64, arch: str = "resnet18") -> Workload:
    """The AdvCL model the trainer builds (pseudo-labels on: three BN branches, one head per K)."""
    from ..config import load_config
    from ..models import build_model

    cfg = load_config(None, [f"model.width={width}", f"model.arch={arch}"])
    m = cfg.model
    model = build_model(m.arch, m.width, ("normal", "pgd", "pgd_ce"), m.proj_dim, m.proj_hidden, cfg.pseudo.ks,
                        init=m.init)
    grads = [p.numel() * p.element_size() for p in model.parameters() if p.requires_grad]
    return Workload(params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                    grad_tensors=tuple(grads[::-1]),
                    buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
                    embed_dim=m.proj_dim, gathers=cfg.attack.steps + 1)


def compute_s(dev: Device, batch: int) -> float:
    """GPU time of one step on one GPU: the reference rate, or the launch floor when the batch is small."""
    return max(batch / dev.images_per_s, dev.ops_per_step * dev.host_s_per_op)


def loss_s(dev: Device, w: Workload, batch: int, global_batch: int) -> float:
    """One rank's global-batch losses per step: [V·b, V·B] fp32 logits, 3 matmuls and `loss_passes` passes."""
    cells = CONTRAST_VIEWS * batch * CONTRAST_VIEWS * global_batch
    return w.gathers * (3 * 2 * cells * w.embed_dim / dev.fp32_flops + dev.loss_passes * cells * 4 / dev.hbm_bw)


def step_terms(dev: Device, w: Workload, n: int, batch: int, fabric_bw: float, algo: str = "best",
               engine: str = "ddp", reduce_scatter: bool = True, clean_once: bool = False) -> dict:
    """One rank's step on n GPUs at `batch` per GPU: its terms (s) and the efficiency against one GPU at
    `ref_batch` (per-GPU images/s ÷ images_per_s). `reduce_scatter`: the gather's backward reduce-scatters,
    as `_GatherRows.backward` does; False models the all-reduce it ran before. `clean_once`: the PGD steps
    gather only the adversarial view, the three clean views (fixed during the attack, no gradient) once per step."""
    def allreduce(nbytes):
        algos = ("ring", "tree") if algo == "best" else (algo,)
        return min(nccl_s("allreduce", nbytes, n, fabric_bw, a) for a in algos)

    def gather(nbytes, backward=True):  # gather_rows: all-gather forward, reduce-scatter backward
        back = nccl_s("reduce_scatter", nbytes, n, fabric_bw) if reduce_scatter else allreduce(nbytes)
        return nccl_s("allgather", nbytes, n, fabric_bw) + (back if backward else 0.0)

    compute = compute_s(dev, batch)
    loss_extra = loss_s(dev, w, batch, n * batch) - loss_s(dev, w, batch, batch)
    grads = [allreduce(b) for b in w.buckets]
    overlap = dev.backward_share * compute
    # DDP: buckets but the last overlap the backward (a lower bound); DeepSpeed reduces after it.
    exposed = sum(grads) if engine == "deepspeed" else grads[-1] + max(0.0, sum(grads[:-1]) - overlap)
    emb = embed_bytes(n * batch, w.embed_dim)
    if clean_once:
        embed = (w.gathers - 1) * gather(emb / CONTRAST_VIEWS) + gather(emb * 3 / 4, backward=False) + gather(emb)
    else:
        embed = w.gathers * gather(emb)
    buffers = nccl_s("broadcast", w.buffer_bytes, n, fabric_bw)
    total = compute + loss_extra + exposed + embed + buffers
    return {"n": n, "batch": batch, "compute": compute, "loss_extra": loss_extra, "grad_comm": sum(grads),
            "grad_exposed": exposed, "embed": embed, "buffers": buffers, "step": total,
            "efficiency": batch / total / dev.images_per_s}


def fit_ring(samples: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(hop_s, bus_bw) of `ring_s("allreduce", ...)` fitted to (n, bytes, seconds) all-reduce timings, least
    squares on relative errors (so that small, latency-bound sizes count as much as large ones)."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array([[2 * (n - 1), 2 * (n - 1) / n * nbytes] for n, nbytes, _ in samples], dtype=float)
    t = np.array([s for *_, s in samples], dtype=float)
    # non-negative: on loaded cores a few noisy timings can make the unconstrained slope or intercept
    # negative; a term below resolution is then 0 (latency) or infinite bandwidth
    (hop, inv_bw), _ = nnls(a / t[:, None], np.ones_like(t))
    return float(hop), (1.0 / float(inv_bw)) if inv_bw > 0 else math.inf


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def scaling_table(dev: Device, w: Workload, gpus=(8, 32, 256), global_batch: int | None = None, **kw) -> str:
    """Markdown: the step's terms per GPU count and fabric, at `ref_batch` per GPU or a fixed global batch."""
    lines = ["| GPUs | fabric between nodes | per-GPU batch | compute ms | loss growth ms | grad all-reduce ms "
             "(exposed) | embedding gather ms | buffers ms | step ms | efficiency |", "|" + "---:|" * 10]
    for n in gpus:
        batch = global_batch // n if global_batch else dev.ref_batch
        fabrics = {"NVLink (one node)": NVLINK} if n <= GPUS_PER_NODE else FABRICS
        for name, bw in fabrics.items():
            r = step_terms(dev, w, n, batch, bw, **kw)
            lines.append(f"| {n} | {name} | {batch} | {ms(r['compute'])} | {ms(r['loss_extra'])} | "
                         f"{ms(r['grad_comm'])} ({ms(r['grad_exposed'])}) | {ms(r['embed'])} | {ms(r['buffers'])} | "
                         f"{ms(r['step'])} | {r['efficiency']:.0%} |")
    return "\n".join(lines)


def collective_table(w: Workload, dev: Device, gpus=(8, 32, 256)) -> str:
    """Markdown: the step's collectives per fabric, ring vs tree for the gradient all-reduce (NCCL runs
    all-gather and reduce-scatter as rings only); one contrast set's forward and backward."""
    lines = ["| GPUs | fabric | gradient all-reduce ring / tree ms | contrast-set all-gather ms "
             "| its backward reduce-scatter ms |", "|---:|---|---:|---:|---:|"]
    for n in gpus:
        fabrics = {"NVLink": NVLINK} if n <= GPUS_PER_NODE else FABRICS
        emb = embed_bytes(n * dev.ref_batch, w.embed_dim)
        for name, bw in fabrics.items():
            grad = [sum(nccl_s("allreduce", b, n, bw, a) for b in w.buckets) for a in ("ring", "tree")]
            lines.append(f"| {n} | {name} | {ms(grad[0])} / {ms(grad[1])} | {ms(nccl_s('allgather', emb, n, bw))} | "
                         f"{ms(nccl_s('reduce_scatter', emb, n, bw))} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images-per-s", type=float, default=Device.images_per_s, help="one GPU, --ref-batch")
    p.add_argument("--ref-batch", type=int, default=Device.ref_batch)
    p.add_argument("--host-us-per-op", type=float, default=Device.host_s_per_op * 1e6)
    p.add_argument("--ops-per-step", type=int, default=Device.ops_per_step)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 32, 256])
    a = p.parse_args(argv)
    dev = Device(images_per_s=a.images_per_s, ref_batch=a.ref_batch, host_s_per_op=a.host_us_per_op * 1e-6,
                 ops_per_step=a.ops_per_step)
    w = workload(a.width)
    print(f"ResNet-18 width {a.width}: {w.params:,} parameters, DDP buckets {[f'{b / MIB:.2f}' for b in w.buckets]} "
          f"MiB, buffers {w.buffer_bytes:,} B, {w.gathers} contrast-set gathers of {CONTRAST_VIEWS} × "
          f"{w.embed_dim} fp32 per image; one GPU: {a.images_per_s:g} images/s at batch {a.ref_batch}\n")
    print(f"Weak scaling, {a.ref_batch} images per GPU (global batch {a.ref_batch} × GPUs):\n")
    print(scaling_table(dev, w, a.gpus))
    print(f"\nFixed global batch {a.ref_batch} (the paper's), split over the GPUs:\n")
    print(scaling_table(dev, w, a.gpus, global_batch=a.ref_batch))
    print(f"\nThe collectives of one step ({a.ref_batch} per GPU):\n")
    print(collective_table(w, dev, a.gpus))
    print("\nChanges, 32 GPUs: efficiency by per-GPU batch, each change added to those above it:\n")
    print(changes_table(dev, w))


def changes_table(dev: Device, w: Workload, n: int = 32, batches=(16, 64, 128, 256, 512)) -> str:
    """Markdown: efficiency at n GPUs by per-GPU batch: the gather's old all-reduce backward (for reference),
    the code as it is (reduce-scatter), and each remaining change of docs/scaling.md added to those above it."""
    fast = replace(dev, host_s_per_op=0.0)
    rest = {"clean_once": True}
    variants = {"before: all-reduce in the gather's backward, DDP": ({"reduce_scatter": False}, dev),
                "as is, DeepSpeed ZeRO-0 (no overlap)": ({"engine": "deepspeed"}, dev), "as is, DDP": ({}, dev),
                "+ clean views gathered once per step": (rest, dev),
                "+ fused loss (logits never written)": (rest, replace(dev, loss_passes=0.0)),
                "+ no launch floor (CUDA graphs)": (rest, replace(fast, loss_passes=0.0))}
    small = replace(w, bucket_cap=5 * MIB)
    lines = ["| change | fabric | " + " | ".join(f"b={b} (global {n * b})" for b in batches) + " |",
             "|---|---|" + "---:|" * len(batches)]
    rows = [(name, kw, d, w) for name, (kw, d) in variants.items()]
    rows.append(("+ DDP bucket_cap_mb=5", rest, replace(fast, loss_passes=0.0), small))
    for name, kw, d, work in rows:
        for fabric in ("100 Gb/s", "400 Gb/s"):
            cells = [f"{step_terms(d, work, n, b, FABRICS[fabric], **kw)['efficiency']:.0%}" for b in batches]
            lines.append(f"| {name} | {fabric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
