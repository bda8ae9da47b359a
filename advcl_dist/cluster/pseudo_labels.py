"""The clustering stage: f_pre features of the unlabelled set → k-means for every K → pseudo-labels.

Runs on one process or on every rank of a launch (torchrun, srun). Each rank extracts the features of
its contiguous block of dataset indices (cached under `features/` for a requeued job) and the k-means
of every K runs over the shards with the features read once. Rank 0 writes `pseudo_labels.npy`
[N, len(K)] int32 (row i = dataset index i), `centroids.npz` (one array per K) and, last,
`clusters.json` (inertia and cluster sizes per K), whose presence marks the stage as done.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import Config, ConfigError, to_yaml
from ..data.source import data_format, image_source
from ..distributed import barrier, distributed_session, gather_shards
from ..engine.preemption import StopRequest
from ..faults import fault_point
from ..folder_lock import folder_lock
from ..run_folder import RUN, RunFolder, save_array, write_json
from .features import load_fpre, pca, shard_features
from .kmeans import fit_kmeans

PSEUDO_LABELS = "pseudo_labels.npy"
CLUSTERS = "clusters.json"


def ensemble_kmeans(x: torch.Tensor, ks, iters: int, seed: int, init: str = "kmeans++",
                    init_sample_per_k: int = 256, log=None) -> tuple[torch.Tensor, dict, dict]:
    """k-means for every K on this rank's rows: labels [n_local, len(ks)] int32, centroids {K: [K, D]},
    stats {"K": {inertia, sizes, reseeded, iterations, seconds}} (global, the same on every rank)."""
    labels = torch.empty(x.shape[0], len(ks), dtype=torch.int32, device=x.device)
    centroids, stats = {}, {}
    for col, k in enumerate(ks):
        start = time.perf_counter()
        r = fit_kmeans(x, k, iters, seed, init, init_sample_per_k)
        labels[:, col] = r.labels.to(torch.int32)
        centroids[k] = r.centroids.cpu().numpy()
        fault_point("cluster.between_k")
        stats[str(k)] = {"inertia": r.inertia, "sizes": r.sizes, "reseeded": r.reseeded,
                         "iterations": r.iterations, "seconds": round(time.perf_counter() - start, 3)}
        if log:
            log(f"K={k}: inertia {r.inertia:.6g}, sizes {min(r.sizes)}–{max(r.sizes)}, "
                f"{r.reseeded} empty re-seeded, {r.iterations} iterations, {stats[str(k)]['seconds']:.1f} s")
    return labels, centroids, stats


def cluster(cfg: Config, stop: StopRequest | None = None) -> Path:
    """Features of f_pre (`pseudo.fpre`) on the training set → ensemble k-means → files in out_dir.

    A launcher's stop request is not polled: a requeued job restarts from the feature cache."""
    p, out = cfg.pseudo, Path(cfg.out_dir)
    if p.fpre is None:
        raise ConfigError("pseudo.fpre is not set; point it at the f_pre checkpoint.pt (e.g. a SimCLR run) "
                          "or a torchvision ResNet-50 state dict")
    with distributed_session(cfg.train.device) as info, folder_lock(out, info):
        dataset = image_source(cfg.data)  # the .beton where the FFCV path is chosen
        too_big = [k for k in p.ks if k > len(dataset)]
        if too_big:
            raise ConfigError(f"pseudo.ks has K={too_big[0]} but {cfg.data.name}/{cfg.data.split} has only "
                              f"{len(dataset)} images")
        encoder, fpre = load_fpre(p.fpre, info.device)

        def log(msg: str) -> None:
            if info.is_main:
                print(f"[cluster] {msg}", flush=True)

        run = RunFolder(out, "cluster", info)
        run.start(to_yaml(cfg), {"restart": True} if (out / RUN).is_file() else None)
        seen = f" at {p.fpre_size}×{p.fpre_size} px" if p.fpre_size else ""
        log(f"f_pre {p.fpre} ({fpre.get('method') or fpre['kind']}){seen} on {cfg.data.name}/{cfg.data.split}: "
            f"{len(dataset)} images over {info.world_size} rank(s), K = {list(p.ks)} → {out}")
        # The cache key says which features the shards hold; K, iterations and PCA may change freely.
        key = {"fpre": fpre["checkpoint"], "fpre_step": fpre.get("step"), "dataset": cfg.data.name,
               "split": cfg.data.split, "root": cfg.data.root, "n": len(dataset), "image_size": cfg.views.size,
               "beton": cfg.data.beton if data_format(cfg.data) == "ffcv" else None}
        if p.fpre_size is not None:  # only when set: caches written before this option stay valid
            key["fpre_size"] = p.fpre_size
        start = time.perf_counter()
        features, _ = shard_features(encoder, dataset, batch_size=cfg.eval.batch_size, image_size=cfg.views.size,
                                     device=info.device, folder=out / "features", key=key, rank=info.rank,
                                     world=info.world_size, resize_to=p.fpre_size)
        del encoder
        fault_point("cluster.after_features")
        log(f"features {features.shape[1]}-d in {time.perf_counter() - start:.1f} s (cached in {out / 'features'})")
        if p.pca is not None:
            features = pca(features, p.pca, p.pca_whiten)
        labels, centroids, stats = ensemble_kmeans(features, p.ks, p.iters, cfg.train.seed, p.init,
                                                   p.init_sample_per_k, log)
        labels, _ = gather_shards(labels)  # shards are contiguous in rank order: this is dataset order
        if info.is_main:
            save_array(labels.cpu().numpy(), out / PSEUDO_LABELS)
            save_array({f"K{k}": c for k, c in centroids.items()}, out / "centroids.npz")
            write_json({"fpre": fpre, "dataset": cfg.data.name, "split": cfg.data.split, "n": len(dataset),
                        "ks": list(p.ks), "iters": p.iters, "init": p.init, "seed": cfg.train.seed,
                        "pca": p.pca, "fpre_size": p.fpre_size, "feature_dim": int(features.shape[1]),
                        "world_size": info.world_size,
                        "clusters": stats}, out / CLUSTERS)
        run.finish()
        barrier()
    return out
