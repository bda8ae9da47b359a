"""`tools/bench.py views`: the views of an AdvCL training step alone, timed, and their operator count.

Per batch size: ms per batch, images/s and the operators dispatched per batch (aten events of the torch
profiler's CPU activity, nested ones included; on CUDA each is a launch or host-side work) for the views
that `AdvCL.training_step` makes: the crop + flip view x, the SimCLR views t1 and t2 and x_h, from a
synthetic uint8 batch on the device, with the default `views` config at --size. Each batch reseeds the
step's random source, as the training loop does.

The same file also times code from before the views were fused (no `methods.advcl.advcl_views`): it then
calls what that code's training step called, crop_flip_view, simclr_views and high_frequency in turn, so
that a copy of this file in a checkout of the older commit measures the row to compare against.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ..config import load_config
from ..distributed import pick_device
from ..rng import StepRandom
from .output import check_json, cores, write_report


def views_of_a_step(size: int):
    """(views(images, random), whether the views are made together): what AdvCL.training_step runs."""
    cfg = load_config(None, [f"views.size={size}"])
    v, radius = cfg.views, cfg.advcl.hf_radius
    from ..methods import advcl

    if hasattr(advcl, "advcl_views"):
        return (lambda images, random: advcl.advcl_views(images, random, v, radius)), True
    from ..data.augment import crop_flip_view
    from ..methods.simclr import simclr_views
    from ..views import high_frequency

    def one_by_one(images, random):
        x = crop_flip_view(images, random, size=v.size, padding=v.padding)
        t1, t2 = simclr_views(images, random, v)
        return x, t1, t2, high_frequency(x, radius)

    return one_by_one, False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def operators(views, images: torch.Tensor, random: StepRandom) -> int:
    """aten events the CPU profiler records for one batch's views (nested calls included)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        views(images, random)
        _sync(images.device)
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def run_batch(views, batch: int, args, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (batch, 3, args.size, args.size), generator=g, dtype=torch.uint8).to(device)
    random = StepRandom(device, args.seed)
    for i in range(args.warmup):
        views(images, random.reseed(i))
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        views(images, random.reseed(i))
        _sync(device)
        times.append(time.perf_counter() - start)
    # Counted on a warm call (the first makes cached constants), after the timing, which the profiler's
    # start and stop would disturb.
    views(images, random.reseed(0))
    ops = operators(views, images, random.reseed(0))
    seconds = statistics.median(times)
    return {"ms_per_batch": seconds * 1e3, "images_per_s": batch / seconds, "operators": ops,
            "batch_ms": [round(t * 1e3, 3) for t in times]}


def main(args) -> dict:
    check_json(args.json)
    torch.set_num_threads(args.threads or cores())
    device = pick_device(args.device)
    views, fused = views_of_a_step(args.size)
    print(f"views of an AdvCL step ({'made together' if fused else 'one by one'}): {args.size}x{args.size} uint8 "
          f"images on {device}, {args.warmup} warm-up + {args.steps} timed batches, "
          f"{torch.get_num_threads()} threads ({cores()} cores)", flush=True)
    runs = {}
    for batch in dict.fromkeys(args.batch):
        runs[str(batch)] = run = run_batch(views, batch, args, device)
        print(f"batch {batch}: {run['ms_per_batch']:.2f} ms, {run['operators']} operators", flush=True)
    report = {"bench": "views", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "cores": cores(), "threads": torch.get_num_threads(), "torch": torch.__version__, "fused": fused,
              "args": {k: v for k, v in vars(args).items() if k != "bench"}, "runs": runs}
    print(views_table(report))
    write_report(report, args.json)
    return report


def views_table(report: dict) -> str:
    lines = ["| batch | ms/batch (median) | images/s | operators/batch |", "|---:|---:|---:|---:|"]
    for batch, run in report["runs"].items():
        lines.append(f"| {batch} | {run['ms_per_batch']:.2f} | {run['images_per_s']:.0f} | {run['operators']} |")
    return "\n".join(lines)
