"""`tools/bench.py step --method M [M ...]`: what one training step of any method or variant costs.

Each method trains on the same synthetic uint8 batch (random labels where it needs labels or pseudo-labels;
a freshly initialised teacher / init checkpoint where it needs one: the cost does not depend on the
weights) with SGD, in bf16 autocast + channels_last on CUDA and fp32 on CPU, as the trainer runs it.
Reported per method: images/s (median over timed steps), FLOPs per image (FlopCounterMode over one extra
step: matmuls and convolutions, backward included) and forward-equivalents per image — the step's FLOPs
divided by one plain forward of the encoder: how many encoder passes a method pays for an image, which
is what makes adversarial methods 5-15× dearer than SimCLR.

The step runs at the last epoch of the configured run (DynACL: its weakest augmentation; lpaff: its
adversarial finetuning phase, not the cheap linear probing).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config, load_config, with_overrides
from ..distributed import pick_device
from ..engine import Trainer
from ..engine.objective import StepContext
from ..methods import METHODS, VARIANTS, build_method, method_values
from ..models import BranchBatchNorm
from ..rng import StepRandom
from .output import check_json, write_report
from .profile import count_costs
from .step import _device_name, _sync

CLASSES = 10
STEPS_PER_EPOCH = 100  # of the step context: only the epoch (the last) matters to the methods


def all_names() -> list[str]:
    return [*sorted(METHODS), *sorted(VARIANTS)]


def _base_overrides(args, device: torch.device) -> list[str]:
    return [f"model.arch={args.arch}", f"model.width={args.width}", f"views.size={args.size}",
            f"attack.steps={args.attack_steps}", "data.name=digits", "data.workers=0", f"train.device={device.type}",
            "pipeline.baselines=[]"]


def _fresh_checkpoint(values: dict, base: list[str], folder: Path) -> str:
    """A checkpoint.pt of the run `values` at initialisation (the cost of using it does not depend on training)."""
    cfg = with_overrides(load_config(None, [*base, f"out_dir={folder}", "train.batch_size=64"]), values)
    trainer = Trainer(cfg)
    trainer.save()
    return str(trainer.checkpoint_path)


def _parent_of(method: str, base_cfg: Config) -> tuple[dict, tuple[int, ...]]:
    """The run (and its pseudo-label Ks) that declares `method` as its post-processing (DynACL++ → lpaff)."""
    for name in all_names():
        values = method_values(name)
        post = METHODS[values["train.method"]].post_process(with_overrides(base_cfg, values))
        if post is not None and post.method == method:
            return values, post.ks
    raise SystemExit(f"--method {method}: no method declares it as its post-processing (it has no init)")


def method_config(name: str, args, device: torch.device, folder: Path, batch: int) -> Config:
    """The config of `name` with whatever it needs (pseudo-labels, teacher, init) made up in `folder`."""
    base = _base_overrides(args, device)
    base_cfg = load_config(None, base)
    values = method_values(name)
    method = values["train.method"]
    needs, extra = METHODS[method].needs, {}
    ks = tuple(base_cfg.pseudo.ks)
    if "init" in needs:
        parent, ks = _parent_of(method, base_cfg)
        extra[f"{method}.init"] = _fresh_checkpoint(parent, base, folder / "init")
    if "teacher" in needs:
        extra[f"{method}.teacher"] = _fresh_checkpoint({"train.method": base_cfg.pipeline.fpre_method}, base,
                                                       folder / "teacher")
    if "pseudo_labels" in needs:
        rng = np.random.default_rng(args.seed)
        path = folder / "pseudo_labels.npy"
        np.save(path, np.stack([rng.integers(0, k, batch) for k in ks], axis=1))
        extra.update({"pseudo.labels": str(path), "pseudo.ks": list(ks)})
    return with_overrides(base_cfg, {**values, **extra, "out_dir": str(folder / "run")})


def forward_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs of one plain forward of the encoder over `images` (eval mode, no gradient)."""
    encoder = model.encoder
    branch = next(next(iter(m.bns)) for m in encoder.modules() if isinstance(m, BranchBatchNorm))
    was_training = encoder.training
    encoder.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(images.float() / 255, ((branch, images.shape[0]),))
    encoder.train(was_training)
    return counter.get_total_flops()


def run_method(name: str, args, device: torch.device) -> dict:
    batch, cuda = args.batch, device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = method_config(name, args, device, Path(tmp), batch)
        method = build_method(cfg, batch, device, num_classes=CLASSES)
        torch.manual_seed(args.seed)
        model = method.build_model().to(device)
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (batch, 3, args.size, args.size), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, CLASSES, (batch,), generator=g).to(device)
    indices = torch.arange(batch, device=device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(method.param_groups(model), lr=0.1, momentum=0.9)
    random = StepRandom(device, args.seed)
    epochs = method.loop_settings().epochs

    def step(i: int) -> torch.Tensor:
        method.train_mode(model)
        ctx = StepContext(step=i, epoch=epochs - 1, total_steps=epochs * STEPS_PER_EPOCH,
                          steps_per_epoch=STEPS_PER_EPOCH, random=random.reseed(i), model=model, module=model,
                          images=images, labels=labels, indices=indices)
        with torch.autocast(device.type, dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            loss = method.training_step(ctx).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        step(i)
        _sync(device)
        times.append(time.perf_counter() - start)
    flops, syncs = count_costs(step, args.warmup + args.steps)
    seconds = statistics.median(times)
    per_image = flops / batch
    return {"method": cfg.train.method, "precision": "bf16 autocast + channels_last" if cuda else "fp32",
            "images_per_s": batch / seconds, "ms_per_step": seconds * 1e3, "flops_per_image": per_image,
            "forward_equivalents": per_image / (forward_flops(model, images) / batch), "host_syncs": syncs}


def table(runs: dict) -> str:
    lines = ["| method | runs | precision | images/s | ms/step | GFLOPs/image | forward-equivalents / image |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['method']} | {r['precision']} | {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} "
                     f"| {r['flops_per_image'] / 1e9:.3f} | {r['forward_equivalents']:.1f} |")
    return "\n".join(lines)


def main(args) -> dict:
    check_json(args.json)
    device = pick_device(args.device)
    if args.batch == "auto":
        raise SystemExit("--method: give --batch N (the search for the largest batch is AdvCL's bench only)")
    names = all_names() if "all" in args.method else list(dict.fromkeys(args.method))
    for name in names:
        method_values(name)  # an unknown name fails before minutes of timing
    print(f"Training step per method: {args.arch} width {args.width}, {args.size} px, batch {args.batch}, "
          f"PGD-{args.attack_steps}, {args.warmup} warm-up + {args.steps} timed steps on {device} "
          f"({_device_name(device)})", flush=True)
    runs = {}
    for name in names:
        runs[name] = run_method(name, args, device)
        print(f"{name}: {runs[name]['ms_per_step']:.1f} ms/step", flush=True)
    report = {"bench": "step-methods", "device": str(device), "device_name": _device_name(device),
              "torch": torch.__version__, "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
              "args": {k: v for k, v in vars(args).items() if k != "bench"}, "methods": runs}
    print(table(runs))
    write_report(report, args.json)
    return report
