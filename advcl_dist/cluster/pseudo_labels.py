"""Ensemble k-means pseudo-labels (ClusterFit) from f_pre features: the clustering stage.

Single process with faiss on the local device; the distributed, sharded version replaces
`ensemble_kmeans` later without changing the files this stage writes:
`pseudo_labels.npy` [N, len(K)] int32 (row i = dataset index i), `centroids.npz` (one array
per K) and `clusters.json` (inertia and cluster sizes per K), written last.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from ..config import Config, ConfigError, to_yaml
from ..data import get_dataset
from ..distributed import node_names, pick_device
from ..engine.checkpoint import load_encoder, write_json, write_text
from ..engine.run_info import now, run_info
from .features import extract_features

PSEUDO_LABELS = "pseudo_labels.npy"
CLUSTERS = "clusters.json"


def ensemble_kmeans(features: np.ndarray, ks, iters: int, seed: int) -> tuple[np.ndarray, dict, dict]:
    """k-means for every K: labels [N, len(ks)] int32, centroids {K: [K, D]}, stats {K: inertia, sizes}."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    labels = np.empty((len(x), len(ks)), dtype=np.int32)
    centroids, stats = {}, {}
    for col, k in enumerate(ks):
        if k > len(x):
            raise ConfigError(f"pseudo.ks has K={k} but the data has only {len(x)} images")
        # faiss subsamples to max_points_per_centroid·K points by default; cluster every point instead.
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=len(x), verbose=False)
        km.train(x)
        distances, assigned = km.index.search(x, 1)
        labels[:, col] = assigned[:, 0]
        centroids[k] = km.centroids.copy()
        stats[str(k)] = {"inertia": float(distances.sum()), "sizes": np.bincount(assigned[:, 0], minlength=k).tolist()}
    return labels, centroids, stats


def cluster(cfg: Config) -> Path:
    """Features of f_pre (`pseudo.fpre`) on the training set → ensemble k-means → files in out_dir."""
    p, out = cfg.pseudo, Path(cfg.out_dir)
    if p.fpre is None:
        raise ConfigError("pseudo.fpre is not set; point it at the f_pre checkpoint.pt (e.g. a SimCLR run)")
    device = pick_device(cfg.train.device)
    dataset = get_dataset(cfg.data.name, cfg.data.split, cfg.data.root, cfg.data.download)
    encoder, fpre = load_encoder(p.fpre, device)
    out.mkdir(parents=True, exist_ok=True)
    write_text(to_yaml(cfg), out / "config.yaml")
    info = run_info(1, node_names(), device)
    print(f"[cluster] f_pre {p.fpre} ({fpre['method']}) on {cfg.data.name}/{cfg.data.split}: "
          f"{len(dataset)} images, K = {list(p.ks)} → {out}", flush=True)
    features = extract_features(encoder, dataset, cfg.eval.batch_size, cfg.views.size, device).numpy()
    labels, centroids, stats = ensemble_kmeans(features, p.ks, p.iters, cfg.train.seed)
    np.save(out / PSEUDO_LABELS, labels)
    np.savez(out / "centroids.npz", **{f"K{k}": c for k, c in centroids.items()})
    for k, s in stats.items():
        print(f"[cluster] K={k}: inertia {s['inertia']:.4g}, sizes {min(s['sizes'])}–{max(s['sizes'])}", flush=True)
    write_json({"fpre": fpre, "dataset": cfg.data.name, "split": cfg.data.split, "n": len(dataset),
                "ks": list(p.ks), "iters": p.iters, "seed": cfg.train.seed, "clusters": stats}, out / CLUSTERS)
    info.update(end=now(), finished=True)
    write_json(info, out / "run.json")
    return out
