"""`tools/bench.py kmeans`: our ensemble k-means on 1 and N processes against faiss.Kmeans and scikit-learn.

The data are synthetic L2-normalised features (a mixture of Gaussian blobs, like f_pre features of a
dataset with many classes), written once to a cached .npy. Each process reads its contiguous block of
rows, as the clustering stage does; the time is the clustering itself (all K), from a barrier after
loading to a barrier at the end. The references run in this process on all cores, same data, same K:
- faiss: `faiss.Kmeans` with `niter` = our iterations, trained on *all* rows (max_points_per_centroid
  = rows, so it does not subsample), then `index.search(x, 1)` for the labels, which ours also
  produces; "faiss-sampled" is its default, training on 256·K rows (labelling all), for reference;
  "faiss-our-start" starts it from our k-means++ centroids (computed untimed), so that the inertia
  compares the Lloyd iterations alone: faiss's own start is K random rows, which ends worse at large K.
- scikit-learn: same iterations (tol=0), its default greedy k-means++ over all rows and one init.
Every inertia is the same computation as ours: float64 squared distances of all rows to their nearest
final centroid, summed.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..cluster.features import shard_range
from ..cluster.kmeans import assign, initial_centroids, row_distances
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


def inertia(x: np.ndarray, centroids: np.ndarray) -> tuple[float, list[int]]:
    """What ours reports: float64 distance of every row to its nearest centroid (rounded to float32), summed."""
    x, c = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = assign(x, c)[1]
    return (float(row_distances(x, c, labels).float().double().sum()),
            torch.bincount(labels, minlength=len(c)).tolist())


FAISS_RUNS = ("faiss", "faiss-sampled", "faiss-our-start")


def run_faiss(path: Path, args: dict, run: str = "faiss") -> dict:
    """faiss.Kmeans per K (`run`: see the module docstring), timed with the search that labels all
    rows, since ours returns the labels too."""
    import faiss

    x = np.load(path)
    threads = len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    sampled = run == "faiss-sampled"
    starts = {k: initial_centroids(torch.from_numpy(x), 0, len(x), k, args["seed"]).numpy()
              for k in args["ks"]} if run == "faiss-our-start" else {}
    stats, centroids, start = {}, {}, time.perf_counter()
    for k in args["ks"]:
        t = time.perf_counter()
        km = faiss.Kmeans(x.shape[1], k, niter=args["iters"], seed=args["seed"],
                          max_points_per_centroid=256 if sampled else len(x))
        km.train(x, init_centroids=starts.get(k))
        trained = time.perf_counter() - t
        km.index.search(x, 1)  # the labels of every row, which the clustering stage needs and ours returns
        centroids[k] = km.centroids
        stats[str(k)] = {"seconds": round(time.perf_counter() - t, 3), "train_seconds": round(trained, 3),
                         "rows_trained": min(len(x), 256 * k) if sampled else len(x), "iterations": args["iters"]}
    seconds = time.perf_counter() - start
    for k in args["ks"]:  # not timed
        stats[str(k)]["inertia"], stats[str(k)]["sizes"] = inertia(x, centroids[k])
    return {"seconds": seconds, "stats": stats, "threads": threads}


def run_sklearn(path: Path, args: dict) -> dict:
    from sklearn.cluster import KMeans

    x = np.load(path)
    stats, start = {}, time.perf_counter()
    for k in args["ks"]:
        t = time.perf_counter()
        # tol=0: no early stop on a small centre shift, so it runs the iterations ours runs (unless
        # the labels stop changing altogether)
        km = KMeans(n_clusters=k, n_init=1, max_iter=args["iters"], tol=0, random_state=args["seed"]).fit(x)
        stats[str(k)] = {"sklearn_inertia": float(km.inertia_), "iterations": int(km.n_iter_),
                         "seconds": round(time.perf_counter() - t, 3), "centroids": km.cluster_centers_}
    seconds = time.perf_counter() - start
    for k in args["ks"]:  # not timed
        stats[str(k)]["inertia"], stats[str(k)]["sizes"] = inertia(x, stats[str(k)].pop("centroids"))
    return {"seconds": seconds, "stats": stats, "threads": len(os.sched_getaffinity(0))}


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
    if args.faiss:
        for run in FAISS_RUNS:
            runs[run] = run_faiss(path, settings, run)
        print(f"faiss: {runs['faiss']['seconds']:.1f} s (all rows), {runs['faiss-sampled']['seconds']:.1f} s "
              f"(its default: 256·K rows sampled), {runs['faiss-our-start']['seconds']:.1f} s (all rows, from "
              "our k-means++ start)", flush=True)
    if args.sklearn:
        runs["sklearn"] = run_sklearn(path, settings)
        print(f"scikit-learn: {runs['sklearn']['seconds']:.1f} s", flush=True)
    report = {"bench": "kmeans", "rows": args.rows, "dim": args.dim, "device": args.device,
              "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, **settings, "runs": runs}
    if "faiss" in runs and "ours-1p" in runs:
        ours, faiss_run = runs["ours-1p"], runs["faiss"]
        report["ours_1p_vs_faiss"] = {
            "time_ratio": ours["seconds"] / faiss_run["seconds"],
            "inertia": {str(k): ours["stats"][str(k)]["inertia"] / faiss_run["stats"][str(k)]["inertia"] - 1
                        for k in settings["ks"]},
            "inertia_same_start": {
                str(k): ours["stats"][str(k)]["inertia"] / runs["faiss-our-start"]["stats"][str(k)]["inertia"] - 1
                for k in settings["ks"]}}
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return report


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(report: dict) -> str:
    """Markdown: seconds per run (and as a multiple of each reference's), then per K the inertia
    relative to faiss's on all rows (or scikit-learn's, without faiss)."""
    runs, ks = report["runs"], report["ks"]
    single = runs.get("ours-1p")
    refs = [r for r in ("faiss", "sklearn") if r in runs]
    head = ["run", "threads/proc", "total s", *(f"time / {r}" for r in refs), *(f"K={k} s" for k in ks),
            "same clusters as 1 process"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for name, run in runs.items():
        same = "–"
        if single and name.startswith("ours-") and run is not single:
            same = "yes" if all(run["stats"][str(k)]["sizes"] == single["stats"][str(k)]["sizes"] for k in ks) else "no"
        lines.append(_row([name, run["threads"], f"{run['seconds']:.1f}",
                           *(f"{run['seconds'] / runs[r]['seconds']:.2f}×" for r in refs),
                           *(f"{run['stats'][str(k)]['seconds']:.1f}" for k in ks), same]))
    if refs:
        ref = runs[refs[0]]["stats"]
        head = [f"inertia vs {refs[0]}", *(f"K={k}" for k in ks)]
        lines += ["", _row(head), "|" + "---|" * len(head)]
        lines += [_row([name, *(f"{run['stats'][str(k)]['inertia'] / ref[str(k)]['inertia'] - 1:+.3%}" for k in ks)])
                  for name, run in runs.items() if name != refs[0]]
    return "\n".join(lines)
