"""`tools/bench.py eval`: the sharded evaluation stage, timed.

Images/s of the sharded evaluation (eval_blocks.sharded_flags): PGD (`evaluate.pgd_block`, PGD-20 by
default) over the digits test images and AutoAttack "standard" (`evaluate.autoattack_block`) over the
first --aa-images, on 1 and N gloo processes sharing the same cores (--threads-total split evenly).
The classifier is a CIFAR ResNet-18 (`Classifier` over one `normal` BN branch) trained first, in this
process, with plain cross-entropy on the digits train split (cached under --cache): accurate on clean
images, so that both attacks have correct images to work on. Each rank loads it, runs one untimed
forward, then the clock runs from a barrier to a barrier around each attack (data decoding included,
process start-up and model loading not; `wall_s` is the whole launch). The per-image flags of every
process count are compared with those of 1 process: the evaluation is rank-invariant by design.
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import load_config
from ..data import get_dataset
from ..data.augment import to_float
from ..distributed import barrier, distributed_session, run_local_ranks
from ..engine.checkpoint import load_checkpoint, save_checkpoint
from ..eval_blocks import sharded_flags
from ..evaluate import autoattack_block, pgd_block
from ..models import BACKBONES, Classifier
from .output import check_json, cores, write_report

IMAGE_SIZE = 32  # digits


def _classifier(width: int) -> Classifier:
    return Classifier(BACKBONES["resnet18"](width, ("normal",)), 10, branch="normal")


def _accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(to_float(x)).argmax(1) for x in images.split(256)])
    return round(100.0 * (pred == labels).float().mean().item(), 2)


def eval_classifier(width: int, steps: int, seed: int, cache: Path) -> tuple[Path, dict]:
    """A digits classifier trained with `steps` SGD steps of plain cross-entropy (batch 128, no augmentation),
    cached as `eval-classifier-*.pt` ({"model", "facts"}); its path and facts (accuracies, training time)."""
    path = Path(cache) / f"eval-classifier-r18w{width}-ce{steps}-s{seed}.pt"
    if path.is_file():
        return path, load_checkpoint(path)["facts"]
    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    torch.manual_seed(seed)
    model = _classifier(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    order, start, batch = torch.randperm(len(train), generator=g), 0, 128
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        if start + batch > len(order):
            order, start = torch.randperm(len(train), generator=g), 0
        idx = order[start:start + batch]
        start += batch
        loss = F.cross_entropy(model(to_float(train.images[idx])), train.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    facts = {"arch": "resnet18", "width": width, "train_steps": steps, "train_batch": batch, "seed": seed,
             "train_seconds": round(time.perf_counter() - t0, 1),
             "train_accuracy": _accuracy(model, train.images, train.labels),
             "test_accuracy": _accuracy(model, test.images, test.labels)}
    save_checkpoint({"model": model.state_dict(), "facts": facts}, path)
    return path, facts


def _timed(run_block, busy: dict, key: str):
    """`run_block`, adding the seconds each call takes to busy[key]."""
    def run(*args):
        start = time.perf_counter()
        try:
            return run_block(*args)
        finally:
            busy[key] += time.perf_counter() - start

    return run


def _eval_rank(state_path: str, s: dict) -> dict:
    """One rank: PGD then AutoAttack over its share of the blocks, each between two barriers."""
    with distributed_session("cpu") as info:
        model = _classifier(s["width"])
        model.load_state_dict(load_checkpoint(Path(state_path))["model"])
        model.eval()
        source = get_dataset("digits", "test")
        with torch.no_grad():  # untimed: first-call allocations
            model(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))
        quiet = lambda _: None  # noqa: E731
        barrier()
        t0 = time.perf_counter()
        busy = {"pgd": 0.0, "autoattack": 0.0}  # seconds inside this rank's blocks (decoding and gather not)
        attack = pgd_block(model, s["eps"], s["step_size"], s["pgd_steps"], s["seed"])
        pgd = sharded_flags("pgd", _timed(attack, busy, "pgd"), 2, source, range(s["images"]), s["batch"], IMAGE_SIZE,
                            info, log=quiet)
        barrier()
        t1 = time.perf_counter()
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # AutoAttack's progress lines
            aa = sharded_flags("autoattack", _timed(autoattack_block(model, s["eps"], s["seed"]), busy, "autoattack"),
                               1, source, range(s["aa_images"]), s["aa_batch"], IMAGE_SIZE, info, log=quiet)
        barrier()
        t2 = time.perf_counter()
        rank, world = info.rank, info.world_size
    out = {"rank": rank, "busy_pgd_s": busy["pgd"], "busy_aa_s": busy["autoattack"]}
    if rank == 0:
        out.update(world=world, pgd_s=t1 - t0, aa_s=t2 - t1, pgd_flags=pgd.tolist(), aa_flags=aa[0].tolist(),
                   aa_log=log.getvalue().splitlines()[-12:])
    return out


def run_eval(state_path: Path, procs: int, threads_total: int, settings: dict) -> dict:
    threads = max(1, threads_total // procs)
    start = time.perf_counter()
    ranks = run_local_ranks(procs, _eval_rank, str(state_path), settings, threads=threads)
    wall = time.perf_counter() - start
    r = ranks[0]
    pgd, aa = np.array(r["pgd_flags"], dtype=np.uint8), np.array(r["aa_flags"], dtype=np.uint8)
    return {"procs": procs, "threads": threads, "pgd_s": r["pgd_s"], "aa_s": r["aa_s"],
            "pgd_images_per_s": settings["images"] / r["pgd_s"], "aa_images_per_s": settings["aa_images"] / r["aa_s"],
            "eval_s": r["pgd_s"] + r["aa_s"], "wall_s": wall,
            "busy_pgd_s": [round(x["busy_pgd_s"], 3) for x in ranks],
            "busy_aa_s": [round(x["busy_aa_s"], 3) for x in ranks],
            "SA": round(100 * pgd[0].mean(), 2), "RA": round(100 * pgd[1].mean(), 2),
            "AA": round(100 * aa.mean(), 2) if aa.size else None,
            "flags": {"pgd": pgd, "aa": aa}, "aa_log": r["aa_log"]}


def eval_main(args) -> dict:
    check_json(args.json)
    attack = load_config(None, []).attack
    n_test = len(get_dataset("digits", "test"))
    images = min(args.images or n_test, n_test)
    aa_images = min(args.aa_images, images)
    settings = {"width": args.width, "images": images, "aa_images": aa_images, "batch": args.batch,
                "aa_batch": args.aa_batch or args.batch, "pgd_steps": args.pgd_steps,
                "eps": args.eps if args.eps is not None else attack.eps,
                "step_size": args.step_size if args.step_size is not None else attack.step_size, "seed": args.seed}
    torch.set_num_threads(args.threads_total)
    path, facts = eval_classifier(args.width, args.train_steps, args.seed, Path(args.cache))
    blocks = math.ceil(images / settings["batch"]), math.ceil(aa_images / settings["aa_batch"])
    print(f"classifier {path}: ResNet-18 width {args.width}, {facts['train_steps']} CE steps, train accuracy "
          f"{facts['train_accuracy']}%, test accuracy {facts['test_accuracy']}%", flush=True)
    print(f"PGD-{settings['pgd_steps']} on {images} digits test images ({blocks[0]} blocks of ≤ {settings['batch']}), "
          f"AutoAttack standard on the first {aa_images} ({blocks[1]} blocks of ≤ {settings['aa_batch']}), "
          f"ε = {settings['eps'] * 255:.3g}/255; {cores()} cores, {args.threads_total} threads in all", flush=True)
    for procs in args.procs:
        if blocks[1] < procs:
            print(f"note: {blocks[1]} AutoAttack block(s) for {procs} processes: some ranks have no AutoAttack work",
                  flush=True)
    runs = {}
    for procs in args.procs:
        runs[f"{procs}p"] = run = run_eval(path, procs, args.threads_total, settings)
        print(f"{procs} process(es) × {run['threads']} thread(s): PGD {run['pgd_s']:.1f} s, AA {run['aa_s']:.1f} s",
              flush=True)
    reference = runs.get("1p") or next(iter(runs.values()))
    for run in runs.values():
        run["same_flags_as_1p"] = bool(all(np.array_equal(run["flags"][k], reference["flags"][k])
                                           for k in ("pgd", "aa")))
    for run in runs.values():
        run["flags"] = {k: v.tolist() for k, v in run["flags"].items()}
    report = {"bench": "eval", "device": "cpu", "cores": cores(), "torch": torch.__version__,
              "threads_total": args.threads_total, "reference_procs": reference["procs"], "classifier": facts,
              "args": {k: v for k, v in vars(args).items() if k != "bench"}, "settings": settings, "runs": runs}
    print(eval_table(report))
    write_report(report, args.json)
    return report


def eval_table(report: dict) -> str:
    s = report["settings"]
    ref = report["reference_procs"]
    lines = [f"| processes × threads | PGD-{s['pgd_steps']} s | PGD-{s['pgd_steps']} images/s | AA s | AA images/s "
             f"| AA busy s per rank | eval s | wall s (with start-up) | SA / RA / AA % | flags = {ref} process(es) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|---|"]
    for run in report["runs"].values():
        busy = " / ".join(f"{b:.1f}" for b in run["busy_aa_s"])
        lines.append(f"| {run['procs']} × {run['threads']} | {run['pgd_s']:.2f} | {run['pgd_images_per_s']:.1f} | "
                     f"{run['aa_s']:.2f} | {run['aa_images_per_s']:.2f} | {busy} | {run['eval_s']:.2f} | "
                     f"{run['wall_s']:.1f} | "
                     f"{run['SA']:.1f} / {run['RA']:.1f} / {run['AA'] if run['AA'] is not None else '–'} | "
                     f"{'yes' if run['same_flags_as_1p'] else 'NO'} |")
    return "\n".join(lines)
