"""`tools/bench.py finetune`: the finetuning step on the shared training loop, timed.

Step images/s of SLF and AFF on the shared loop (`Trainer(cfg, objective=Finetuning(cfg)).train_step`),
one process, on the digits train split, from a tiny AdvCL encoder pretrained on the fly (one epoch of 5
steps, cached under --cache). The loader's batches are read before the clock starts: the time is the
step alone (views, attack, forward, backward, SGD), not data loading (reported beside it).
"""
from __future__ import annotations

import contextlib
import io
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import load_config
from ..data import get_dataset
from ..engine.checkpoint import load_checkpoint
from .output import check_json, cores, write_report

FT_MODES = ("slf", "alf", "aff")
PRETRAIN_BATCH = 256  # one epoch of the 1437 digits train images: 5 steps


def pretrained_encoder(width: int, seed: int, cache: Path) -> Path:
    """One epoch (5 steps of 256) of AdvCL on digits without pseudo-labels, width `width`; cached."""
    from ..engine import Trainer

    out = Path(cache) / f"ft-pretrain-advcl-r18w{width}-s{seed}"
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file() and load_checkpoint(checkpoint).get("finished"):
        return checkpoint
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(load_config(None, pretrain_overrides(out, width, seed))).fit()
    return checkpoint


def pretrain_overrides(out: Path, width: int, seed: int) -> list[str]:
    return [f"out_dir={out}", "data.name=digits", "data.workers=0", "train.device=cpu", f"model.width={width}",
            f"train.batch_size={PRETRAIN_BATCH}", "train.epochs=1", "optim.warmup_epochs=0", "attack.steps=1",
            f"train.seed={seed}"]


def finetune_overrides(out: Path, checkpoint: Path, mode: str, batch: int, attack_steps: int, epochs: int,
                       seed: int) -> list[str]:
    return [f"out_dir={out}", "data.name=digits", "data.workers=0", "train.device=cpu",
            f"finetune.checkpoint={checkpoint}", f"finetune.mode={mode}", f"finetune.batch_size={batch}",
            f"finetune.epochs={epochs}", f"attack.supervised_steps={attack_steps}", f"train.seed={seed}"]


def run_finetune_mode(mode: str, checkpoint: Path, args) -> dict:
    from ..engine import Trainer
    from ..finetune import Finetuning

    n = args.warmup + args.steps
    epochs = math.ceil(n / max(1, len(get_dataset("digits", "train")) // args.batch)) + 1
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, finetune_overrides(Path(out), checkpoint, mode, args.batch, args.attack_steps, epochs,
                                                   args.seed))
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = Trainer(cfg, objective=Finetuning(cfg))
        # The batches, read before the clock starts, epoch after epoch as the loop reads them.
        batches, epoch, t0 = [], 0, time.perf_counter()
        while len(batches) < n:
            trainer.loader.set_epoch(epoch)
            for batch in trainer.loader:
                batches.append(batch)
                if len(batches) == n:
                    break
            epoch += 1
        load_ms = (time.perf_counter() - t0) / n * 1e3
        trainer.objective.train_mode(trainer.engine.module)
        times = []
        for i, batch in enumerate(batches):
            if i and i % trainer.steps_per_epoch == 0:
                trainer.objective.train_mode(trainer.engine.module)  # as the loop does at each epoch
            start = time.perf_counter()
            metrics = trainer.train_step(*batch)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        loss = float(metrics["loss"])
    seconds = statistics.median(times)
    return {"images_per_s": args.batch / seconds, "ms_per_step": seconds * 1e3,
            "mean_ms_per_step": statistics.fmean(times) * 1e3, "step_ms": [round(t * 1e3, 2) for t in times],
            "load_ms_per_batch": load_ms, "last_loss": loss, "steps_per_epoch": trainer.steps_per_epoch}


def finetune_main(args) -> dict:
    check_json(args.json)
    torch.set_num_threads(args.threads or cores())
    checkpoint = pretrained_encoder(args.width, args.seed, Path(args.cache))
    cfg = load_config(None, [])
    print(f"finetuning on the shared loop: encoder {checkpoint} (AdvCL, ResNet-18 width {args.width}), digits, "
          f"batch {args.batch}, PGD-{args.attack_steps} in ALF/AFF, {args.warmup} warm-up + {args.steps} timed steps, "
          f"1 process × {torch.get_num_threads()} threads ({cores()} cores)", flush=True)
    modes = {}
    for mode in dict.fromkeys(args.modes):
        modes[mode] = run = run_finetune_mode(mode, checkpoint, args)
        print(f"{mode}: {run['ms_per_step']:.1f} ms/step", flush=True)
    report = {"bench": "finetune", "device": "cpu", "cores": cores(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "pretrained": str(checkpoint),
              "args": {k: v for k, v in vars(args).items() if k != "bench"},
              "config": {"eps": cfg.attack.eps, "step_size": cfg.attack.step_size, "attack_steps": args.attack_steps,
                         "trades_beta": cfg.finetune.trades_beta, "bn_branch": cfg.finetune.bn_branch},
              "modes": modes}
    print(finetune_table(report))
    write_report(report, args.json)
    return report


def finetune_table(report: dict) -> str:
    lines = ["| mode | images/s | ms/step (median) | ms/step (mean) | min–max ms | data loading ms/batch (not timed) |",
             "|---|---:|---:|---:|---|---:|"]
    for mode, run in report["modes"].items():
        lines.append(f"| {mode} | {run['images_per_s']:.1f} | {run['ms_per_step']:.1f} | {run['mean_ms_per_step']:.1f} "
                     f"| {min(run['step_ms']):.1f}–{max(run['step_ms']):.1f} | {run['load_ms_per_batch']:.1f} |")
    return "\n".join(lines)
