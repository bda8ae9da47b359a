"""`tools/bench.py step`: what one AdvCL training step (views, both PGD attacks, update) costs, several ways.

Every mode runs on the same synthetic uint8 batch and random pseudo-labels (one column per K of
pseudo.ks), the schema's default config (the paper's CIFAR settings), a model built afresh with the same
seed and SGD (lr 0.1, momentum 0.9); the weights change from step to step, which does not change the cost.

  reference     the authors' forward pattern (bench/reference.py): one forward per view, the clean
                views re-forwarded at every PGD step; fp32
  fp32          ours: AdvCL.training_step, one backward, SGD step
  bf16          ours under bf16 autocast, channels_last on CUDA: what the trainer runs on a GPU
  bf16-unfused  bf16 with advcl.fuse_attacks=false: the two attacks one after the other, not sharing a forward
                per PGD step (which saves passes and host time but copies at every BN layer)
  bf16-compile  bf16 with the model in torch.compile (--compile); an error is recorded, not raised
  supervised    the yardstick: one crop+flip view through the `normal` branch into a linear classifier,
                cross-entropy, update; bf16 + channels_last on CUDA, fp32 on CPU

Times are medians over steps synchronised on CUDA. FLOPs come from FlopCounterMode over one extra,
untimed step (matmuls and convolutions, backward included). The AdvCL efficiency divides AdvCL's achieved
FLOP rate by the supervised step's: how well the many small attack forwards use the device compared with
plain training. On CUDA a large bf16 matmul gives the device's practical peak.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config, load_config
from ..data.augment import crop_flip_view
from ..distributed import pick_device
from ..engine.objective import StepContext
from ..methods import Method, build_method
from ..models import Classifier
from ..rng import StepRandom
from .output import check_json, write_report
from .profile import count_costs, profile_steps, profile_table
from .reference import reference_step
from .step_report import derived, table

MODES = ("reference", "fp32", "bf16", "bf16-unfused", "supervised")
CLASSES = 10  # of the supervised yardstick's classifier
PROFILED_STEPS = 2  # with --profile: after the timed and the counted steps


@dataclass
class Setup:
    """The batch every mode trains on, and the AdvCL method that owns the pseudo-labels."""

    cfg: Config
    method: Method
    images: torch.Tensor  # uint8 [B, 3, S, S]
    indices: torch.Tensor  # arange(B): row i of the pseudo-labels belongs to image i
    pseudo: torch.Tensor  # [B, len(ks)]
    classes: torch.Tensor  # [B] labels of the supervised yardstick

    def fresh_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.method.build_model().to(self.method.device).train()


def make_setup(batch: int, arch: str, width: int, size: int, attack_steps: int, seed: int,
               device: torch.device) -> Setup:
    """Random images and pseudo-labels; the labels go through a pseudo_labels.npy, as in training,
    because AdvCL decides from cfg.pseudo.labels whether its model has the `pgd_ce` branch and heads."""
    overrides = [f"model.arch={arch}", f"model.width={width}", f"views.size={size}", f"attack.steps={attack_steps}"]
    ks = load_config(None, overrides).pseudo.ks
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    pseudo = torch.stack([torch.randint(0, k, (batch,), generator=g) for k in ks], dim=1)
    classes = torch.randint(0, CLASSES, (batch,), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pseudo_labels.npy"
        np.save(path, pseudo.numpy())
        cfg = load_config(None, [*overrides, f"pseudo.labels={path}"])
        method = build_method(cfg, batch, device)
    indices = torch.arange(batch, device=device)
    return Setup(cfg, method, images.to(device), indices, method.pseudo_labels[indices], classes.to(device))


def make_step(mode: str, setup: Setup, seed: int) -> tuple[Callable[[int], torch.Tensor], str]:
    """A function running training step `i` of `mode` (forward, backward, SGD) and returning its loss,
    and the precision it runs in."""
    device = setup.method.device
    cuda = device.type == "cuda"
    bf16 = mode.startswith("bf16") or (mode == "supervised" and cuda)
    model = setup.fresh_model(seed)
    if mode == "supervised":
        model = Classifier(model.encoder, CLASSES, branch="normal").to(device)
    channels_last = bf16 and cuda
    if channels_last:
        model.to(memory_format=torch.channels_last)
    random = StepRandom(device, seed)
    cfg, v = setup.cfg, setup.cfg.views
    if mode == "supervised":
        def loss_of(i):
            x = crop_flip_view(setup.images, random.reseed(i), size=v.size, padding=v.padding)
            return F.cross_entropy(model(x), setup.classes)
    elif mode == "reference":
        def loss_of(i):
            return reference_step(model, setup.images, setup.pseudo, cfg, random.reseed(i))
    else:
        net = torch.compile(model) if mode == "bf16-compile" else model
        method = setup.method
        if mode == "bf16-unfused":
            method = copy.copy(method)
            method.settings = replace(method.settings, fuse_attacks=False)

        def loss_of(i):
            return method.training_step(StepContext.of_batch(net, setup.images, setup.indices, random.reseed(i),
                                                             module=model)).loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(i: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = loss_of(i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, ("bf16 autocast" if bf16 else "fp32") + (" + channels_last" if channels_last else "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, setup: Setup, args) -> dict:
    device, batch = setup.method.device, setup.images.shape[0]
    step, precision = make_step(mode, setup, args.seed)
    for i in range(args.warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        step(i)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    # The FLOP counter and the sync recorder see aten ops, which compiled code does not dispatch: count
    # the same step eagerly.
    counter_step = make_step("bf16", setup, args.seed)[0] if mode == "bf16-compile" else step
    first = args.warmup + args.steps
    flops, syncs = count_costs(counter_step, first)
    seconds = statistics.median(times)
    run = {"precision": precision, "images_per_s": batch / seconds, "ms_per_step": seconds * 1e3,
           "step_ms": [round(t * 1e3, 3) for t in times], "flops_per_image": flops / batch,
           "tflops": flops / seconds / 1e12, "peak_gib": peak, "host_syncs": syncs}
    if args.profile:
        run["profile"] = profile_steps(step, first + 1, PROFILED_STEPS, device, Path(args.profile), mode)
    return run


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def auto_batch(args, device: torch.device) -> int:
    """The largest power of two <= 1024 with which one bf16 and one reference step fit in GPU memory."""
    batch = 1024
    while batch >= 1:
        if _fits(batch, args, device):
            return batch
        _free(device)  # after _fits returned: the OOM's traceback no longer holds its tensors
        batch //= 2
    raise SystemExit("--batch auto: not even one image fits in GPU memory")


def _fits(batch: int, args, device: torch.device) -> bool:
    try:
        setup = make_setup(batch, args.arch, args.width, args.size, args.attack_steps, args.seed, device)
        for mode in ("bf16", "reference"):
            make_step(mode, setup, args.seed)[0](0)
            _sync(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False


def matmul_peak_tflops(device: torch.device, n: int = 8192, warmup: int = 3, iters: int = 20) -> float:
    """bf16 n×n @ n×n: the matmul rate this GPU reaches in practice (the ceiling for our achieved rates)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _check_outputs(args) -> None:
    """Fail before minutes of timing, not after, when --json or --profile cannot be written."""
    check_json(args.json)
    if args.profile:
        try:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"--profile {args.profile}: cannot create the folder ({e.strerror})") from None


def main(args) -> dict:
    _check_outputs(args)
    device = pick_device(args.device)
    if args.batch == "auto":
        if device.type != "cuda":
            raise SystemExit("--batch auto needs CUDA (it searches for the largest batch that fits in GPU memory)")
        args.batch = auto_batch(args, device)
    modes = list(dict.fromkeys(args.modes or MODES))
    if args.compile:
        modes.insert(modes.index("bf16") + 1 if "bf16" in modes else len(modes), "bf16-compile")
    setup = make_setup(args.batch, args.arch, args.width, args.size, args.attack_steps, args.seed, device)
    name = _device_name(device)
    a = setup.cfg.attack
    print(f"AdvCL step: {args.arch} width {args.width}, {args.size} px, batch {args.batch}, PGD-{a.steps} ×2, "
          f"K = {list(setup.cfg.pseudo.ks)}, {args.warmup} warm-up + {args.steps} timed steps on {device} ({name})",
          flush=True)
    runs = {}
    for mode in modes:
        try:
            runs[mode] = run_mode(mode, setup, args)
        except Exception as e:  # torch.compile's failures are a result; any other mode's are bugs
            if mode != "bf16-compile":
                raise
            runs[mode] = {"error": f"{type(e).__name__}: {e}"}
        _free(device)
        print(f"{mode}: " + (runs[mode].get("error") or f"{runs[mode]['ms_per_step']:.1f} ms/step"), flush=True)
    peak = matmul_peak_tflops(device) if device.type == "cuda" else None
    report = {"bench": "step", "device": str(device), "device_name": name, "torch": torch.__version__,
              "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
              # "fp32" modes on CUDA: PyTorch's defaults let cuDNN convolutions use TF32, matmuls not
              "tf32": {"conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
              "cudnn_benchmark": torch.backends.cudnn.benchmark,
              "args": {k: val for k, val in vars(args).items() if k != "bench"},
              "config": {"eps": a.eps, "step_size": a.step_size, "steps": a.steps, "ks": list(setup.cfg.pseudo.ks),
                         "temperature": setup.cfg.loss.temperature, "pseudo_weight": setup.cfg.advcl.pseudo_weight},
              "modes": runs}
    report["derived"] = derived(runs, peak)
    profiled = profile_table(runs)
    if profiled:
        print(f"Where the time goes ({args.profile}; {PROFILED_STEPS} profiled steps per mode):\n{profiled}\n")
    print(table(report))
    write_report(report, args.json)
    return report
