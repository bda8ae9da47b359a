"""k-means (Lloyd) over rows sharded across ranks: faiss assigns each shard, float64 all-reduces update.

Every rank passes its contiguous block of the rows (rank order = row order). Everything that picks
rows — the initial centroids and the re-seeding of empty clusters — goes by *global* row index, and the
centroid update sums in float64 before rounding to float32, so the result does not depend on how the
rows are split over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.distributed as dist

from ..distributed import gather_shards, world_size

INITS = ("kmeans++", "random")


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, D] float32, identical on every rank
    labels: torch.Tensor  # [n_local] int64: nearest final centroid of each local row
    inertia: float  # global sum of squared distances to the nearest final centroid
    sizes: list[int]  # global rows per cluster
    reseeded: int  # empty clusters re-seeded, summed over iterations


def kmeans(x, k: int, iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids [k, D] (the same on every rank) and the labels of this rank's rows (DESIGN §3)."""
    result = fit_kmeans(x, k, iters, seed)
    return result.centroids, result.labels


def fit_kmeans(x, k: int, iters: int = 20, seed: int = 0, init: str = "kmeans++",
               init_sample_per_k: int = 256) -> KMeansResult:
    """`iters` Lloyd updates from `init`, then a final assignment; see the module docstring."""
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"kmeans needs rows [n, D], got shape {tuple(x.shape)}")
    x = x.float().contiguous()
    counts = gather_shards(torch.tensor([x.shape[0]], device=x.device))[0].tolist()
    offset, total = sum(counts[:_rank()]), sum(counts)
    if not 1 <= k <= total:
        raise ValueError(f"k-means with K={k} needs 1 <= K <= the number of rows ({total})")
    if init not in INITS:
        raise ValueError(f"k-means init {init!r} is not one of {list(INITS)}")
    generator = torch.Generator().manual_seed(seed)
    if init == "random":
        centroids = _rows_at(x, offset, torch.randperm(total, generator=generator)[:k])
    else:
        sample = _rows_at(x, offset, torch.randperm(total, generator=generator)[:min(total, init_sample_per_k * k)])
        centroids = _kmeans_plusplus(sample, k, seed)
    reseeded = 0
    norms = torch.linalg.vector_norm(x, dim=1).square()  # for the near-tie test, once rather than per pass
    for _ in range(iters):
        distances, labels = assign(x, centroids, norms)
        sums = _sums_and_counts(x, labels, k)
        _all_reduce(sums)
        sizes = sums[:, -1]
        filled = sizes > 0
        centroids = centroids.clone()
        centroids[filled] = (sums[filled, :-1] / sizes[filled, None]).float()
        empty = torch.nonzero(~filled).flatten()
        if len(empty):
            centroids[empty] = _rows_at(x, offset, _farthest(distances, offset, len(empty)))
            reseeded += len(empty)
    distances, labels = assign(x, centroids, norms)
    stats = torch.zeros(k + 1, dtype=torch.float64, device=x.device)
    stats[:k] = torch.bincount(labels, minlength=k).double()
    stats[k] = distances.double().sum()
    _all_reduce(stats)
    return KMeansResult(centroids, labels, float(stats[k]), [int(s) for s in stats[:k].tolist()], reseeded)


def _sums_and_counts(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[k, D + 1] float64: per-centroid sums of the rows and, last, their counts.

    Converted to float64 a block at a time into one reused buffer: converting the whole shard at once
    costs a fresh allocation (page faults) of twice its size at every iteration.
    """
    sums = torch.zeros(k, x.shape[1] + 1, dtype=torch.float64, device=x.device)
    block = 8192 if x.device.type == "cpu" else 1 << 18
    buffer = torch.empty(min(block, x.shape[0]), x.shape[1], dtype=torch.float64, device=x.device)
    for rows, rows_labels in zip(x.split(block), labels.split(block)):
        part = buffer[:len(rows)]
        part.copy_(rows)
        sums[:, :-1].index_add_(0, rows_labels, part)
    sums[:, -1] = torch.bincount(labels, minlength=k).double()
    return sums


# Rows whose two nearest centroids are this close (relative to ‖x‖² + max‖c‖²) are decided in float64.
NEAR_TIE = 1e-4


def assign(x: torch.Tensor, centroids: torch.Tensor, norms: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest centroid for every row, with faiss on x's device.

    faiss ranks in float32 via ‖x‖² + ‖c‖² − 2x·c, whose rounding depends on how the BLAS blocks the
    rows, so on a million rows a few near-equidistant ones would be ranked differently on 1 and on N
    ranks, and the runs would drift apart. The two best are therefore searched, and rows whose two
    are nearly tied are settled by float64 distances (exact ties: the lower centroid index).
    Without a near tie, float32's errors (~1e-6 relative) cannot change which centroid is nearest.
    `norms`: the rows' squared norms, when the caller keeps them.
    """
    top = min(2, centroids.shape[0])
    if x.device.type == "cuda":
        if hasattr(faiss, "GpuIndexFlatL2"):
            distances, labels = _search_faiss_gpu(x, centroids, top)
        else:  # a faiss-cpu build on a GPU machine: stay on the device
            distances, labels = search_torch(x, centroids, top)
    else:
        # faiss follows torch's thread count, so N ranks on one node do not each start one thread per core.
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(centroids.cpu().float().numpy())
        distances, labels = (torch.from_numpy(a) for a in index.search(x.numpy(), top))
    if top == 1:
        return distances[:, 0], labels[:, 0]
    if norms is None:
        norms = torch.linalg.vector_norm(x, dim=1).square()
    return _settle_near_ties(x, norms, centroids, distances, labels)


def _settle_near_ties(x, norms, centroids, distances, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose two best are within NEAR_TIE: float64 distances to every centroid, first minimum wins.

    Every centroid, not just the two: a third may be as near (always so with duplicate centroids).
    """
    best, nearest = distances[:, 0].clone(), labels[:, 0].clone()
    scale = norms + centroids.square().sum(1).max()
    near = torch.nonzero(distances[:, 1] - distances[:, 0] <= NEAR_TIE * scale).flatten()
    c64 = centroids.to(x.device, torch.float64)
    for rows in near.split(max(1, (1 << 22) // c64.numel())):  # [rows, K, D] float64 blocks of 32 MB
        # elementwise (x − c)², not a matmul: the same arithmetic for a row however rows are blocked
        exact = (x[rows, None, :].double() - c64).square().sum(-1)
        winner = exact.argmin(1)  # ties: the first, i.e. the lower centroid index
        nearest[rows] = winner
        best[rows] = exact.gather(1, winner[:, None])[:, 0].float()
    return best.clamp_min(0), nearest


def search_torch(x: torch.Tensor, centroids: torch.Tensor, top: int = 1,
                 chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top` nearest centroids by torch matmuls (‖x‖² − 2x·c + ‖c‖²), for a faiss without GPU support."""
    c = centroids.to(x.device, torch.float32)
    c_norms = (c * c).sum(1)
    distances, labels = [], []
    for part in x.split(chunk):
        d = (part * part).sum(1, keepdim=True) - 2 * part @ c.T + c_norms
        best = d.topk(top, dim=1, largest=False)
        distances.append(best.values.clamp_min(0))
        labels.append(best.indices)
    return torch.cat(distances), torch.cat(labels)


_GPU_RESOURCES: dict[int, object] = {}


def _search_faiss_gpu(x: torch.Tensor, centroids: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    # An index on this rank's own GPU only: faiss.Kmeans(gpu=True) would spread over every visible GPU,
    # colliding with the other ranks of the node.
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss read and write torch tensors on the GPU)

    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if device not in _GPU_RESOURCES:  # its scratch memory is allocated once per device, not per call
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = device
    index = faiss.GpuIndexFlatL2(_GPU_RESOURCES[device], x.shape[1], config)
    index.add(centroids.to(x.device, torch.float32).contiguous())
    return index.search(x, top)


def _rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def _all_reduce(t: torch.Tensor) -> None:
    if world_size() > 1:
        dist.all_reduce(t)


def _rows_at(x: torch.Tensor, offset: int, index: torch.Tensor) -> torch.Tensor:
    """Rows at global indices `index` (the same on every rank), on every rank: the owner fills them in."""
    index = index.to(x.device)
    rows = torch.zeros(len(index), x.shape[1], dtype=torch.float32, device=x.device)
    mine = (index >= offset) & (index < offset + x.shape[0])
    rows[mine] = x[index[mine] - offset]
    _all_reduce(rows)  # one non-zero term per entry: exact
    return rows


def _kmeans_plusplus(sample: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """scikit-learn's greedy k-means++ on rank 0, broadcast: every rank starts from the same centroids."""
    if _rank() == 0:
        from sklearn.cluster import kmeans_plusplus

        centres, _ = kmeans_plusplus(sample.cpu().numpy(), k, random_state=seed)
        centroids = torch.from_numpy(np.ascontiguousarray(centres, dtype=np.float32)).to(sample.device)
    else:
        centroids = torch.empty(k, sample.shape[1], dtype=torch.float32, device=sample.device)
    if world_size() > 1:
        dist.broadcast(centroids, 0)
    return centroids


def _farthest(distances: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """Global indices of the `count` rows farthest from their centroid (ties: lower index first)."""

    def best(d: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((i, -d))[:count]
        return d[order], i[order]

    d, i = best(distances.double().cpu().numpy(), np.arange(offset, offset + len(distances)))
    local = torch.from_numpy(np.stack([d, i.astype(np.float64)], 1)).to(distances.device)
    candidates = gather_shards(local)[0].cpu().numpy()  # float64 holds any row index exactly
    _, chosen = best(candidates[:, 0], candidates[:, 1].astype(np.int64))
    return torch.from_numpy(chosen)
