"""What one training step of `tools/bench.py step` costs besides time: FLOPs, host syncs and, with
`--profile DIR`, where the time goes (torch.profiler).

The profile writes DIR/<mode>.trace.json (chrome://tracing or https://ui.perfetto.dev) and
DIR/<mode>.ops.txt (the top operations by self time), and summarises the step as the share of self time
per kind of operation (device time on CUDA, CPU time on CPU) and the time of the step's named ranges
(advcl/views, advcl/attacks, advcl/training_forward, the optimizer step).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from ..engine.host_sync import HostSyncRecorder

# First match wins; the names are aten operators (cudnn_/mkldnn_ convolutions and their backward included).
CATEGORIES = (("convolution", ("conv",)), ("batch norm", ("batch_norm",)),
              ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "matmul", "linear")), ("fft", ("fft",)),
              ("copy / cat", ("copy", "aten::cat", "clone", "contiguous")),
              ("sampling (views)", ("grid_sampler", "aten::index", "gather")))
RANGES = ("advcl/views", "advcl/attacks", "advcl/training_forward", "Optimizer.step")


class _GlobalTotalOnly(contextlib.nullcontext):
    """Stands in for FlopCounterMode's per-module tracker: its hooks make torch.autograd.grad with a leaf
    input (PGD's x_adv) fail (pytorch/pytorch#131753, open), and we need the global total only."""

    parents = ("Global",)


def count_costs(step: Callable[[int], torch.Tensor], i: int) -> tuple[int, list[str]]:
    """FLOPs (matmuls and convolutions, backward included) of step `i`, and its host-synchronising ops."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalTotalOnly()
    with counter, HostSyncRecorder() as recorder:
        step(i)
    return counter.get_total_flops(), [f"{s.op} at {s.where}" for s in recorder.syncs]


HOST = "host: Python, autograd engine"
OTHER = "other aten ops (elementwise, …)"


def category(name: str) -> str:
    """The kind of a profiler row; what is not an aten operator is time the host spends between them."""
    if not name.startswith("aten::"):
        return HOST
    return next((cat for cat, keys in CATEGORIES if any(k in name for k in keys)), OTHER)


def range_name(key: str) -> str | None:
    return next((name for name in RANGES if key.startswith(name)), None)  # "Optimizer.step#SGD.step"


def profile_steps(step: Callable[[int], torch.Tensor], first: int, steps: int, device: torch.device,
                  folder: Path, mode: str) -> dict:
    """Profile `steps` steps from step `first`; write the trace and the op table; return the summary."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(first, first + steps):
            with record_function("bench/step"):  # its self time: the host's time between operators
                step(i)
        if cuda:
            torch.cuda.synchronize(device)
    folder.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(folder / f"{mode}.trace.json"))
    averages = prof.key_averages()
    self_time = "self_device_time_total" if cuda else "self_cpu_time_total"
    (folder / f"{mode}.ops.txt").write_text(averages.table(sort_by=self_time, row_limit=30) + "\n")
    shares: dict[str, float] = {}
    # Rows of the host's events only (on CUDA an operator's kernels are its self device time), so no kernel is
    # counted twice.
    for e in averages:
        if e.device_type == DeviceType.CPU:
            shares[category(e.key)] = shares.get(category(e.key), 0.0) + getattr(e, self_time)
    total = sum(shares.values()) or 1.0
    ranges = {}
    for e in averages:
        if name := range_name(e.key):
            kind = "device_ms" if e.device_type == DeviceType.CUDA else "host_ms"
            ranges.setdefault(name, {})[kind] = (e.device_time_total if kind == "device_ms"
                                                 else e.cpu_time_total) / 1e3 / steps
    return {"steps": steps, "trace": str(folder / f"{mode}.trace.json"), "time_basis": self_time,
            "self_time_ms_per_step": total / 1e3 / steps,
            "share": {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}, "ranges": ranges}


def profile_table(runs: dict) -> str:
    """Share of self time per kind of operation, one column per profiled mode."""
    profiled = {mode: r["profile"] for mode, r in runs.items() if "profile" in r}
    if not profiled:
        return ""
    kinds = [cat for cat, _ in CATEGORIES] + [OTHER, HOST]
    lines = ["| self time | " + " | ".join(profiled) + " |", "|---|" + "---:|" * len(profiled)]
    lines.append("| ms per step | " + " | ".join(f"{p['self_time_ms_per_step']:.1f}" for p in profiled.values()) + " |")
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(f"{p['share'].get(kind, 0.0):.1%}" for p in profiled.values()) + " |")
    for name in RANGES:
        cells = []
        for p in profiled.values():
            r = p["ranges"].get(name, {})
            cells.append(" / ".join(f"{r[k]:.1f}" for k in ("host_ms", "device_ms") if k in r) or "–")
        lines.append(f"| {name} ms (host / device) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
