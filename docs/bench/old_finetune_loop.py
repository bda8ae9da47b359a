"""Step time of the pre-issue-17 finetuning loop (advcl_dist at fcb21a2, `Finetuner`), timed exactly as
`tools/bench.py finetune` times the shared loop: batches read first, then per step views + attack + forward
+ backward + SGD (+ the per-step metric tensors the old loop logged); median over the timed steps.
Only full batches are timed (the old loop also trained on each epoch's partial last batch; the shared loop drops it).
Run from a checkout of fcb21a2, with the current venv and the encoder `tools/bench.py finetune` cached:
  git worktree add /tmp/oldft fcb21a2
  PYTHONPATH=/tmp/oldft .venv/bin/python docs/bench/old_finetune_loop.py --threads 2 --cache .cache/bench
"""
import argparse
import contextlib
import io
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import advcl_dist
from advcl_dist.config import load_config
from advcl_dist.data import get_dataset
from advcl_dist.engine import Trainer
from advcl_dist.engine.checkpoint import load_checkpoint
from advcl_dist.finetune import Finetuner

p = argparse.ArgumentParser()
p.add_argument("--modes", nargs="+", default=["slf", "aff"])
p.add_argument("--width", type=int, default=16)
p.add_argument("--batch", type=int, default=128)
p.add_argument("--attack-steps", type=int, default=10)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--cache", default="/tmp/oldbench/cache")
args = p.parse_args()
print("advcl_dist from", advcl_dist.__file__)
torch.set_num_threads(args.threads)
out = Path(args.cache) / f"ft-pretrain-advcl-r18w{args.width}-s{args.seed}"
ckpt = out / "checkpoint.pt"
if not (ckpt.is_file() and load_checkpoint(ckpt).get("finished")):
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(load_config(None, [f"out_dir={out}", "data.name=digits", "data.workers=0", "train.device=cpu",
                                   f"model.width={args.width}", "train.batch_size=256", "train.epochs=1",
                                   "optim.warmup_epochs=0", "attack.steps=1", f"train.seed={args.seed}"])).fit()
res = {}
for mode in args.modes:
    n = args.warmup + args.steps
    epochs = math.ceil(n / max(1, len(get_dataset("digits", "train")) // args.batch)) + 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"out_dir={tmp}", "data.name=digits", "data.workers=0", "train.device=cpu",
                                 f"finetune.checkpoint={ckpt}", f"finetune.mode={mode}",
                                 f"finetune.batch_size={args.batch}", f"finetune.epochs={epochs}",
                                 f"attack.supervised_steps={args.attack_steps}", f"train.seed={args.seed}"])
        ft = Finetuner(cfg)
        batches, epoch = [], 0
        while len(batches) < n:
            ft.loader.set_epoch(epoch)
            for b in ft.loader:
                batches.append(b)
                if len(batches) == n:
                    break
            epoch += 1
        ft.set_train_mode()
        times = []
        for i, (images, labels, _) in enumerate(batches):
            if i and i % ft.loader.batches_per_epoch == 0:
                ft.set_train_mode()
            start = time.perf_counter()
            loss, logits = ft.step(images, labels)
            ft.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ft.optimizer.step()
            metrics = {"loss": loss.detach(), "acc": (logits.detach().argmax(1) == labels).float().mean() * 100}
            if i >= args.warmup and len(images) == args.batch:  # the new loop drops partial batches
                times.append(time.perf_counter() - start)
    s = statistics.median(times)
    res[mode] = {"images_per_s": args.batch / s, "ms_per_step": s * 1e3, "mean_ms": statistics.fmean(times) * 1e3,
                 "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "timed_steps": len(times)}
    print(mode, json.dumps(res[mode]), flush=True)
print(json.dumps({"loop": "old (fcb21a2 Finetuner)", "threads": torch.get_num_threads(), "modes": res}))
