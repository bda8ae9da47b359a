"""Plateau study of issue 18: how many early steps AdvCL's contrastive loss spends at the value of a collapsed
embedding in the demo (configs/demo.yaml), per seed, for a candidate setting.

At collapse every embedding is the same point, so every logit of the multi-view NT-Xent is equal and the loss is
scale · ln(V·B − 1) (V = 4 views, B = the batch, scale = temperature / base_temperature): 44.54 for the demo.
A step counts as "at collapse" when its contrastive loss is within 0.5 of that value (the demo's loss leaves it
by several points once training takes hold).

One process per seed (one OpenMP thread each), all with the same pseudo-labels (PSEUDO, from a demo run), so
that only the AdvCL stage's own random stream and the candidate's settings differ. Prints and appends one JSON
line per (candidate, seed):
python docs/bench/plateau.py --name constant --seeds 0 1 2 --steps 44 attack.eps_ramp_epochs=0
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WITHIN = 0.5


def collapse_value(cfg) -> float:
    scale = cfg.loss.temperature / cfg.loss.base_temperature if cfg.loss.base_temperature else 1.0
    return scale * math.log(4 * cfg.train.batch_size - 1)


def one_seed(seed: int, steps: int, overrides: list[str], out: Path) -> dict:
    from advcl_dist.config import load_config
    from advcl_dist.engine import Trainer

    cfg = load_config(ROOT / "configs/demo.yaml", [f"out_dir={out}", f"train.seed={seed}", "train.log_every=1",
                                                   "train.ckpt_every=100000", *overrides])
    Trainer(cfg).fit(stop_after_steps=steps)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_con"] for r in rows]
    collapse = collapse_value(cfg)
    at = [loss >= collapse - WITHIN for loss in losses]
    escape = next((i + 1 for i in range(len(at)) if not any(at[i:])), None)  # first step of the last run below
    a = cfg.attack
    setting = {"eps": a.eps, "step_size": a.step_size, "attack_steps": a.steps, "eps_ramp_epochs": a.eps_ramp_epochs,
               "amp": cfg.train.amp, "channels_last": cfg.train.channels_last}
    return {"seed": seed, "setting": setting, "steps": len(losses), "collapse": round(collapse, 3),
            "steps_at_collapse": sum(at),
            "left_collapse_at_step": escape, "loss_con": [round(v, 3) for v in losses],
            "attack_gain": [round(r["attack_gain"], 3) for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=66, help="steps of the demo's 132 (default: 6 epochs)")
    parser.add_argument("--pseudo", default=str(ROOT / "runs/demo/cluster/pseudo_labels.npy"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs/bench/plateau.jsonl"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a worker: this seed only
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [f"pseudo.labels={args.pseudo}", *args.overrides]
    if args.one is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one_seed(args.one, args.steps, overrides, Path(tmp))), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, results = list(args.seeds), []
    while pending:
        batch, pending = pending[:args.parallel], pending[args.parallel:]
        procs = [subprocess.Popen([sys.executable, __file__, "--one", str(s), "--name", args.name, "--steps",
                                   str(args.steps), "--pseudo", args.pseudo, *args.overrides],
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT) for s in batch]
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                sys.exit(f"seed run failed ({proc.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
    with open(args.out, "a") as f:
        for r in results:
            line = {"candidate": args.name, "overrides": args.overrides, **r}
            f.write(json.dumps(line) + "\n")
            print(f"{args.name:>12} seed {r['seed']}: {r['steps_at_collapse']:3d} of {r['steps']} steps at collapse "
                  f"({r['collapse']}), left it for good at step {r['left_collapse_at_step']}; loss_con at 10/30/"
                  f"last: {r['loss_con'][9]} / {r['loss_con'][min(29, r['steps'] - 1)]} / {r['loss_con'][-1]}")


if __name__ == "__main__":
    main()
