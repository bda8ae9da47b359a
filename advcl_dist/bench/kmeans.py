"""`tools/bench.py kmeans`: our ensemble k-means on 1 and N processes against scikit-learn's KMeans.

The data are synthetic L2-normalised features (a mixture of Gaussian blobs, like f_pre features of a
dataset with many classes), written once to a cached .npy. Each process reads its contiguous block of
rows, as the clustering stage does; the time is the clustering itself (all K), from a barrier after
loading to a barrier at the end. scikit-learn runs in this process on all cores, same data, same K,
same iterations (tol=0), its default greedy k-means++ over all rows and one init.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..cluster.features import shard_range
from ..cluster.pseudo_labels import ensemble_kmeans
from ..distributed import barrier, distributed_session, pick_device, run_local_ranks


def synthetic_features(rows: int, dim: int, centres: int, seed: int, cache: Path) -> Path:
    """A [rows, dim] float32 .npy of L2-normalised blob features, generated once per setting."""
    path = Path(cache) / f"kmeans-{rows}x{dim}-c{centres}-s{seed}.npy"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)).astype(np.float32)
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
    for lo in range(0, rows, 1 << 18):
        hi = min(rows, lo + (1 << 18))
        x = means[rng.integers(0, centres, hi - lo)] + 0.5 * rng.normal(size=(hi - lo, dim)).astype(np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    os.replace(tmp, path)
    return path


def _cluster_shard(path: str, args: dict) -> dict | None:
    """One rank: its block of rows, every K; rank 0 returns the time and the statistics."""
    with distributed_session(args["device"]) as info:
        rows = np.load(path, mmap_mode="r")
        lo, hi = shard_range(len(rows), info.rank, info.world_size)
        x = torch.from_numpy(np.array(rows[lo:hi])).to(info.device)  # a copy in memory, not the memmap
        barrier()
        start = time.perf_counter()
        _, _, stats = ensemble_kmeans(x, args["ks"], args["iters"], args["seed"])
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        barrier()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "stats": stats, "device": str(info.device)} if info.rank == 0 else None


def run_ours(path: Path, procs: int, args: dict) -> dict:
    threads = max(1, len(os.sched_getaffinity(0)) // procs) if args["device"] == "cpu" else 1
    result = run_local_ranks(procs, _cluster_shard, str(path), args, threads=threads)[0]
    return {**result, "threads": threads}


def run_sklearn(path: Path, args: dict) -> dict:
    from sklearn.cluster import KMeans

    x = np.load(path)
    stats, start = {}, time.perf_counter()
    for k in args["ks"]:
        t = time.perf_counter()
        # tol=0: no early stop on a small centre shift, so it runs the iterations ours runs (unless
        # the labels stop changing altogether)
        km = KMeans(n_clusters=k, n_init=1, max_iter=args["iters"], tol=0, random_state=args["seed"]).fit(x)
        stats[str(k)] = {"inertia": float(km.inertia_), "iterations": int(km.n_iter_),
                         "seconds": round(time.perf_counter() - t, 3)}
    return {"seconds": time.perf_counter() - start, "stats": stats, "threads": len(os.sched_getaffinity(0))}


def main(args) -> dict:
    settings = {"ks": list(args.ks), "iters": args.iters, "seed": args.seed, "device": args.device}
    if args.device == "cuda":
        pick_device("cuda")  # a clear error when there is no GPU
    path = synthetic_features(args.rows, args.dim, args.centres, args.seed, Path(args.cache))
    print(f"data: {path} ({args.rows} × {args.dim} float32), K = {settings['ks']}, {args.iters} iterations, "
          f"{len(os.sched_getaffinity(0))} cores", flush=True)
    runs = {}
    for procs in args.procs:
        runs[f"ours-{procs}p"] = run_ours(path, procs, settings)
        print(f"ours, {procs} process(es): {runs[f'ours-{procs}p']['seconds']:.1f} s", flush=True)
    if args.sklearn:
        runs["sklearn"] = run_sklearn(path, settings)
        print(f"scikit-learn: {runs['sklearn']['seconds']:.1f} s", flush=True)
    report = {"bench": "kmeans", "rows": args.rows, "dim": args.dim, "device": args.device,
              "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, **settings, "runs": runs}
    print(table(report))
    print(json.dumps(report))
    return report


def table(report: dict) -> str:
    """Markdown: seconds per run and, per K, inertia relative to scikit-learn's."""
    runs = report["runs"]
    reference = runs.get("sklearn")
    single = runs.get("ours-1p")
    lines = ["| run | threads/proc | total s | speed-up vs sklearn | " + " | ".join(f"K={k} s" for k in report["ks"])
             + " | inertia vs sklearn (worst K) | same clusters as 1 process |", "|" + "---|" * (len(report["ks"]) + 6)]
    for name, run in runs.items():
        speed = f"{reference['seconds'] / run['seconds']:.2f}×" if reference else "–"
        worst = same = "–"
        if reference and name != "sklearn":
            worst = "{:+.3%}".format(max((run["stats"][str(k)]["inertia"] / reference["stats"][str(k)]["inertia"] - 1
                                          for k in report["ks"]), key=abs))
        if single and name.startswith("ours-") and run is not single:
            same = "yes" if all(run["stats"][str(k)]["sizes"] == single["stats"][str(k)]["sizes"]
                                for k in report["ks"]) else "no"
        per_k = " | ".join(f"{run['stats'][str(k)]['seconds']:.1f}" for k in report["ks"])
        lines.append(f"| {name} | {run['threads']} | {run['seconds']:.1f} | {speed} | {per_k} | {worst} | {same} |")
    return "\n".join(lines)
