"""`tools/bench.py scaling`: the communication of data-parallel AdvCL, measured on gloo, next to the model.

On each process count (gloo ranks of this machine, sharing its cores) rank 0 times, with a barrier before
each repetition:
  grad       DDP's gradient all-reduces: the bucket sizes are recorded from a real DDP backward of the
             AdvCL model (comm hook, after DDP rebuilt its buckets), then the same sizes are all-reduced
             directly, issued asynchronously in bucket order and waited for, as DDP issues them (the
             backward they overlap with on a GPU is not timed: on shared CPU cores it cannot overlap);
  gather     `gather_rows` (the global-batch loss's all-gather of [4 views × local batch, proj_dim] fp32)
  scatter    its backward (a reduce-scatter: each rank gets its own rows' summed gradient), both the code
             the step runs. The model predicts NCCL's reduce-scatter, but gloo (torch 2.14) runs one as a
             clone, an all-reduce of the whole tensor and a copy of this rank's chunk (profiled), so here
             it moves an all-reduce's bytes;
  buffers    the BN buffers broadcast from rank 0 that DDP runs before each training forward;
  sweep      plain all-reduces of 4 KiB .. the largest of the above, to fit the ring model's hop latency
             and bus bandwidth for gloo on this machine (per process count, and one fit over all of them).
The model (scaling_model.ring_s with the fitted constants; all-gather and reduce-scatter take (n−1) hops and
(n−1)/n of the bytes, an all-reduce twice that) predicts each measured collective. One process
has no process group: DDP wraps nothing and `gather_rows` returns its input (timed: its overhead).
Also counted, once, in this process: the ATen ops one AdvCL step dispatches (a proxy for kernel launches).
"""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.distributed as dist

from ..distributed import barrier, distributed_session, gather_rows, run_local_ranks
from . import scaling_model as sm
from .output import check_json, cores, write_report

# Allocations, aliases and dtype queries: dispatched, but no kernel runs.
NO_KERNEL = {"detach", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "promote_types",
             "result_type", "alias", "lift_fresh", "_has_compatible_shallow_copy_type"}


def count_step_ops(batch: int, width: int = 4, size: int = 32) -> dict:
    """ATen ops of one bf16 AdvCL step (views, both attacks, training forward and backward; no optimizer):
    the kernels a step launches whatever its batch, which set its floor at small per-GPU batches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..config import load_config
    from ..engine.objective import StepContext
    from ..rng import StepRandom
    from .step import make_setup

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kernels = self.other = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.is_view or func.overloadpacket.__name__ in NO_KERNEL:
                self.other += 1
            else:
                self.kernels += 1
            return func(*args, **(kwargs or {}))

    steps = load_config(None, []).attack.steps
    setup = make_setup(batch, "resnet18", width, size, steps, 0, torch.device("cpu"))
    model, random = setup.fresh_model(0), StepRandom("cpu", 0)

    def step(i):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = setup.method.training_step(StepContext.of_batch(model, setup.images, setup.indices,
                                                                   random.reseed(i))).loss
        loss.backward()

    step(0)
    with Counter() as counter:
        step(1)
    return {"batch": batch, "width": width, "kernels": counter.kernels, "views_and_allocations": counter.other}


def _timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one untimed, each started after a barrier."""
    times = []
    for i in range(repeats + 1):
        barrier()
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def ddp_bucket_bytes(width: int) -> tuple[list[int], list[torch.Tensor]]:
    """The bytes of each bucket DDP all-reduces in a backward of the AdvCL model (after its rebuild), and the
    model's buffers; a real forward of the five training views (2 rows each, 8 px) through the three branches."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from ..config import load_config
    from ..models import build_model, views_plan

    m, ks = load_config(None, []).model, load_config(None, []).pseudo.ks
    torch.manual_seed(0)
    model = build_model("resnet18", width, ("normal", "pgd", "pgd_ce"), m.proj_dim, m.proj_hidden, ks)
    ddp, seen = DistributedDataParallel(model), []

    def hook(state, bucket):
        seen.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    for _ in range(2):  # DDP rebuilds its buckets in gradient-ready order after the first backward
        seen.clear()
        out = ddp(torch.rand(10, 3, 8, 8), views_plan(("pgd", "normal", "normal", "normal", "pgd_ce"), 2))
        (out["proj"].sum() + sum(logits.sum() for logits in out["pseudo_logits"])).backward()
    return list(seen), list(model.buffers())


def _gather_times(x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of `gather_rows(x)` and of its backward, each after a barrier (one untimed round)."""
    forward, backward = [], []
    for i in range(repeats + 1):
        barrier()
        start = time.perf_counter()
        out = gather_rows(x)[0]
        middle = time.perf_counter()
        barrier()
        resumed = time.perf_counter()
        out.backward(torch.ones_like(out))
        if i:
            forward.append(middle - start)
            backward.append(time.perf_counter() - resumed)
    return statistics.median(forward), statistics.median(backward)


def _rank(s: dict) -> dict | None:
    """One rank: every timing of the module docstring; rank 0 returns them."""
    with distributed_session("cpu") as info:
        n, local = info.world_size, s["batch"] // info.world_size
        x = torch.randn(sm.CONTRAST_VIEWS * local, s["embed_dim"], requires_grad=True)
        gather_s, scatter_s = _gather_times(x, s["repeats"])
        run = {"procs": n, "local_batch": local, "gather_bytes": n * x.numel() * x.element_size(),
               "gather_s": gather_s, "scatter_s": scatter_s}
        if n == 1:
            return run
        buckets, buffers = ddp_bucket_bytes(s["width"])
        flat = [torch.ones(b // 4) for b in buckets]
        run["ddp_bucket_bytes"] = buckets
        run["buffer_bytes"] = sum(b.numel() * b.element_size() for b in buffers)
        run["grad_s"] = _timed(lambda: [w.wait() for w in [dist.all_reduce(t, async_op=True) for t in flat]],
                               s["repeats"])
        group = dist.distributed_c10d._get_default_group()
        run["buffers_s"] = _timed(lambda: dist._broadcast_coalesced(group, buffers, 250 * sm.MIB, 0), s["repeats"])
        top, size, sweep = max(max(buckets), run["gather_bytes"]), 4096, []
        while True:
            t = torch.ones(size // 4)
            sweep.append({"bytes": size, "s": _timed(lambda t=t: dist.all_reduce(t), s["repeats"])})
            if size >= top:
                break
            size = min(size * 4, top)
        run["sweep"] = sweep
        return run if info.rank == 0 else None


def predict(run: dict, fits: dict[str, tuple[float, float]]) -> dict:
    """Each collective's bytes, measured seconds and the ring model's seconds with each fitted (hop, bus bw)."""
    n = run["procs"]
    shapes = {"gather": ("allgather", [run["gather_bytes"]], run["gather_s"]),
              "scatter": ("reduce_scatter", [run["gather_bytes"]], run["scatter_s"])}
    if n > 1:
        shapes["grad"] = ("allreduce", run["ddp_bucket_bytes"], run["grad_s"])
        shapes["buffers"] = ("broadcast", [run["buffer_bytes"]], run["buffers_s"])
    return {key: {"bytes": sum(sizes), "measured_s": measured,
                  **{f"model_{name}_s": sum(sm.ring_s(kind, b, n, bw, hop) for b in sizes)
                     for name, (hop, bw) in fits.items()}}
            for key, (kind, sizes, measured) in shapes.items()}


def main(args) -> dict:
    check_json(args.json)
    w = sm.workload(args.width)
    settings = {"width": args.width, "batch": args.batch, "repeats": args.repeats, "embed_dim": w.embed_dim}
    print(f"scaling: ResNet-18 width {args.width} ({w.params:,} parameters), global batch {args.batch}, "
          f"{args.repeats} repetitions, gloo on {cores()} cores, processes {args.procs}", flush=True)
    ops = [count_step_ops(b) for b in (8, 16)]
    print(f"ATen ops with a kernel per AdvCL step: {[o['kernels'] for o in ops]} at batch 8, 16", flush=True)
    runs = {}
    for procs in dict.fromkeys(args.procs):
        runs[f"{procs}p"] = run_local_ranks(procs, _rank, settings, threads=max(1, cores() // procs))[0]
        print(f"{procs} process(es) done", flush=True)
    samples = [(r["procs"], p["bytes"], p["s"]) for r in runs.values() for p in r.get("sweep", [])]
    joint = sm.fit_ring(samples) if samples else (0.0, math.inf)
    for run in runs.values():
        own = sm.fit_ring([(run["procs"], p["bytes"], p["s"]) for p in run["sweep"]]) if "sweep" in run else joint
        run["fit"] = {"hop_s": own[0], "bus_bytes_per_s": own[1]}
        run["collectives"] = predict(run, {"own": own, "joint": joint})
    report = {"bench": "scaling", "device": "cpu", "backend": "gloo", "cores": cores(), "torch": torch.__version__,
              "args": {k: v for k, v in vars(args).items() if k != "bench"},
              "model": {"params": w.params, "grad_bytes": sum(w.buckets), "ddp_bucket_bytes": list(w.buckets),
                        "buffer_bytes": w.buffer_bytes, "embed_dim": w.embed_dim, "gathers_per_step": w.gathers},
              "ops_per_step": ops, "fit": {"hop_s": joint[0], "bus_bytes_per_s": joint[1], "samples": len(samples)},
              "runs": runs}
    print(scaling_bench_table(report))
    write_report(report, args.json)
    return report


NAMES = {"grad": "gradient all-reduce (DDP buckets)", "gather": "contrast-set all-gather",
         "scatter": "its backward reduce-scatter", "buffers": "BN buffer broadcast"}


def scaling_bench_table(report: dict) -> str:
    """Markdown: the fits, then each collective measured vs the ring model (this count's fit; one fit over all)."""
    fits = [f"{r['procs']} processes: hop {r['fit']['hop_s'] * 1e6:.1f} µs, bus "
            f"{r['fit']['bus_bytes_per_s'] / 1e9:.3f} GB/s" for r in report["runs"].values() if "sweep" in r]
    fit = report["fit"]
    head = (f"ring fits of the all-reduce sweeps: {'; '.join(fits)}; over all counts together ({fit['samples']} "
            f"timings): hop {fit['hop_s'] * 1e6:.1f} µs, bus {fit['bus_bytes_per_s'] / 1e9:.3f} GB/s\n\n"
            if fits else "")
    lines = ["| processes | collective | bytes | measured ms | model ms (this count's fit) | model ÷ measured "
             "| model ms (one fit) | model ÷ measured |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for run in report["runs"].values():
        for key, c in run["collectives"].items():
            cells = [f"{c[f'model_{fit}_s'] * 1e3:.3f} | " + (f"{c[f'model_{fit}_s'] / c['measured_s']:.2f}"
                                                              if run["procs"] > 1 else "–") for fit in ("own", "joint")]
            lines.append(f"| {run['procs']} | {NAMES[key]} | {c['bytes']:,} | {c['measured_s'] * 1e3:.3f} | "
                         + " | ".join(cells) + " |")
    return head + "\n".join(lines)
