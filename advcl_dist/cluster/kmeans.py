"""k-means (Lloyd) over rows sharded across ranks, whose result does not depend on how they are split.

Every rank passes its contiguous block of the rows (rank order = row order). Everything that picks
rows — the initial centroids and the re-seeding of empty clusters — goes by *global* row index. The
centroid sums are integers (the rows in int64 fixed point), which add up to the same total in any
order and any split, so every rank count gets the same centroids bit for bit; and since they are exact,
each iteration only adds in what the rows that changed cluster moved. Assignment is a float32 matmul
(torch's BLAS, or faiss on a GPU), with the few near-tied rows settled in float64 (see `assign`).
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
    iterations: int = 0  # Lloyd updates run: fewer than asked once no row changes cluster (a fixed point)


def kmeans(x, k: int, iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids [k, D] (the same on every rank) and the labels of this rank's rows (DESIGN §3)."""
    result = fit_kmeans(x, k, iters, seed)
    return result.centroids, result.labels


def fit_kmeans(x, k: int, iters: int = 20, seed: int = 0, init: str = "kmeans++",
               init_sample_per_k: int = 256) -> KMeansResult:
    """`iters` Lloyd updates from `init`, then a final assignment; see the module docstring.

    Stops early, with the same result, once an assignment moves no row and leaves no cluster empty:
    the centroids then equal the previous ones bit for bit, so every later iteration would repeat it.
    """
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
    centroids = initial_centroids(x, offset, total, k, seed, init, init_sample_per_k)
    norms = torch.linalg.vector_norm(x, dim=1).square()  # for the near-tie test, once rather than per pass
    shift = _fixed_point_shift(x, total)
    totals = torch.zeros(k, x.shape[1] + 1, dtype=torch.int64, device=x.device)  # fixed-point sums | counts
    labels, reseeded, done = None, 0, 0
    while done < iters:
        new = assign(x, centroids, norms)[1]
        change = _moved(x, labels, new, k, shift)
        _all_reduce(change)
        totals += change[:k]
        sizes = totals[:, -1]
        filled = sizes > 0
        previous, centroids, labels, done = centroids, centroids.clone(), new, done + 1
        centroids[filled] = (totals[filled, :-1].double() * 2.0 ** -shift / sizes[filled, None]).float()
        empty = torch.nonzero(~filled).flatten()
        if len(empty):
            distances = row_distances(x, previous, labels)
            centroids[empty] = _rows_at(x, offset, _farthest(distances, offset, len(empty)))
            reseeded += len(empty)
        elif int(change[k, 0]) == 0:
            break  # a fixed point: `labels` is also the final assignment
    else:
        labels = assign(x, centroids, norms)[1]
    stats = torch.zeros(k + 1, dtype=torch.float64, device=x.device)
    stats[:k] = torch.bincount(labels, minlength=k).double()
    # float64 per row, rounded to float32 before the sum, as the near-tie settlement reports them
    stats[k] = row_distances(x, centroids, labels).float().double().sum()
    _all_reduce(stats)
    return KMeansResult(centroids, labels, float(stats[k]), [int(s) for s in stats[:k].tolist()], reseeded, done)


def initial_centroids(x: torch.Tensor, offset: int, total: int, k: int, seed: int, init: str = "kmeans++",
                      init_sample_per_k: int = 256) -> torch.Tensor:
    """The starting centroids [k, D] (the same on every rank): `k` rows drawn by global index, or greedy
    k-means++ over a drawn sample of `init_sample_per_k`·k rows. tools/bench.py starts faiss from them too."""
    generator = torch.Generator().manual_seed(seed)
    if init == "random":
        return _rows_at(x, offset, torch.randperm(total, generator=generator)[:k])
    sample = _rows_at(x, offset, torch.randperm(total, generator=generator)[:min(total, init_sample_per_k * k)])
    return _kmeans_plusplus(sample, k, seed)


def _fixed_point_shift(x: torch.Tensor, total: int) -> int:
    """The power of two that takes the rows to int64 fixed point: |x|·2^shift < 2⁶⁰/total for the largest |x|
    of any rank, so a sum over all rows, and a difference of two such sums, stays below 2⁶¹. For
    L2-normalised rows and a million of them, steps of 2⁻⁴¹: far below float32's resolution of a centroid."""
    top = torch.maximum(x.amax(), -x.amin()) if x.numel() else torch.zeros((), device=x.device)
    if world_size() > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    exponent = int(torch.frexp(top.double().cpu()).exponent)  # top < 2**exponent
    return min(100, 60 - total.bit_length() - exponent)  # 2**100 is still a float32


def _moved(x: torch.Tensor, old: torch.Tensor | None, new: torch.Tensor, k: int, shift: int) -> torch.Tensor:
    """[k + 1, D + 1] int64: what the rows that changed cluster (at first, all rows) add to each cluster's
    fixed-point sum and, last column, count; in the last row, how many rows moved."""
    rows = torch.arange(len(new), device=x.device) if old is None else torch.nonzero(new != old).flatten()
    sums = torch.zeros(k, x.shape[1], dtype=torch.int64, device=x.device)
    block = max(1, min(len(rows), 1 << 12))  # reused 2 MB buffers: fresh ones per block cost more
    scaled = torch.empty(block, x.shape[1], device=x.device)
    fixed = torch.empty(block, x.shape[1], dtype=torch.int64, device=x.device)
    for part in rows.split(block):
        torch.index_select(x, 0, part, out=scaled[:len(part)]).mul_(2.0 ** shift)  # exact: a power of two
        q = fixed[:len(part)].copy_(scaled[:len(part)])  # truncated: the same on every rank
        sums.index_put_((new[part],), q, accumulate=True)  # integers: any order gives the same sum
        if old is not None:
            sums.index_put_((old[part],), q.neg_(), accumulate=True)
    counts = torch.bincount(new[rows], minlength=k)
    if old is not None:
        counts -= torch.bincount(old[rows], minlength=k)
    out = torch.zeros(k + 1, x.shape[1] + 1, dtype=torch.int64, device=x.device)
    out[:k, :-1], out[:k, -1], out[k, 0] = sums, counts, len(rows)
    return out


def row_distances(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 ‖x − c_label‖² of every row, elementwise: the same for a row however the rows are split."""
    c64 = centroids.to(x.device, torch.float64)
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)
    block = 1 << (16 if x.device.type == "cuda" else 10)  # one reused buffer: fresh ones per block cost more
    buffer = torch.empty(min(len(x), block), x.shape[1], dtype=torch.float64, device=x.device)
    for lo in range(0, len(x), block):
        part = buffer[:len(x[lo:lo + block])]
        part.copy_(x[lo:lo + block]).sub_(c64[labels[lo:lo + block]]).square_()
        torch.sum(part, 1, out=out[lo:lo + len(part)])
    return out


def near_tie_bound(dim: int) -> float:
    """Relative bound on float32's error in the gap between two squared distances ‖x‖² + ‖c‖² − 2x·c
    (norms and dot products summed in any order): each is off by at most 2γ(‖x‖² + ‖c‖²), γ = n·u/(1 − n·u)
    with n = D + 4 and u = 2⁻²⁴. Never below 1e-4, the margin used before the bound was derived."""
    n = (dim + 4) * 2.0 ** -24
    return max(1e-4, 4 * n / (1 - n))


def assign(x: torch.Tensor, centroids: torch.Tensor, norms: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest centroid for every row, on x's device.

    float32 distances ‖x‖² + ‖c‖² − 2x·c round differently with how the BLAS blocks the rows, so on a
    million rows a few near-equidistant ones would be ranked differently on 1 and on N ranks, and the
    runs would drift apart. The two best are therefore searched, and rows whose two are within
    `near_tie_bound` are settled by float64 distances (exact ties: the lower centroid index); beyond
    it float32's error cannot change which centroid is nearest. `norms`: the rows' squared norms.
    """
    top = min(2, centroids.shape[0])
    if norms is None:
        norms = torch.linalg.vector_norm(x, dim=1).square()
    if x.device.type == "cuda" and hasattr(faiss, "GpuIndexFlatL2"):
        distances, labels = _search_faiss_gpu(x, centroids, top)
    else:  # the CPU, or a faiss-cpu build on a GPU machine
        distances, labels = search_torch(x, centroids, top, norms=norms)
    if top == 1:
        return distances[:, 0], labels[:, 0]
    return _settle_near_ties(x, norms, centroids, distances, labels)


def _settle_near_ties(x, norms, centroids, distances, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose two best are within the bound: float64 distances, the first minimum wins. The candidates
    are every centroid (a third may be as near) whose float32 distance is within the bound of the best:
    the exact minimum is among them, and only they get the costly float64 distance."""
    best, nearest = distances[:, 0].clone(), labels[:, 0].clone()
    c = centroids.to(x.device, torch.float32)
    c_norms, c64 = c.square().sum(1), c.double()
    tol = near_tie_bound(x.shape[1]) * (norms + c_norms.max())
    near = torch.nonzero(distances[:, 1] - distances[:, 0] <= tol).flatten()
    for rows in near.split(max(1, (1 << 22) // len(c))):  # [rows, K] blocks of 16 MB
        d = torch.addmm(c_norms, x[rows], c.T, alpha=-2) + norms[rows, None]
        row, col = torch.nonzero(d - d.amin(1, keepdim=True) <= tol[rows, None], as_tuple=True)
        exact = torch.full(d.shape, float("inf"), dtype=torch.float64, device=x.device)
        for pairs in torch.arange(len(row), device=x.device).split(max(1, (1 << 22) // x.shape[1])):
            i, j = row[pairs], col[pairs]
            # elementwise (x − c)², not a matmul: the same arithmetic for a row however rows are blocked
            exact[i, j] = (x[rows[i]].double() - c64[j]).square().sum(1)
        winner = exact.argmin(1)  # ties: the first, i.e. the lower centroid index
        nearest[rows] = winner
        best[rows] = exact.gather(1, winner[:, None])[:, 0].float()
    return best.clamp_min(0), nearest


def search_torch(x: torch.Tensor, centroids: torch.Tensor, top: int = 1, chunk: int | None = None,
                 norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top` nearest centroids by float32 matmuls, ‖x‖² + (‖c‖² − 2x·c), a block of rows at a time. On the
    CPU, torch's BLAS (MKL on x86) is about twice as fast as faiss-cpu's search on the same threads."""
    c = centroids.to(x.device, torch.float32)
    c_norms = c.square().sum(1)
    if norms is None:
        norms = torch.linalg.vector_norm(x, dim=1).square()
    across = 0 if len(c) <= 16 and top <= 2 else 1  # the dimension of d the centroids run along
    if chunk is None:  # d [K, rows] or [rows, K]: 4 MB blocks on the CPU (faster than larger), 256 MB on a GPU
        chunk = max(1 << 10, (1 << (26 if x.device.type == "cuda" else 20)) // len(c))
    distances = torch.empty(len(x), top, device=x.device)
    labels = torch.empty(len(x), top, dtype=torch.int64, device=x.device)
    for lo in range(0, len(x), chunk):
        part = x[lo:lo + chunk]
        if across == 0:
            d = torch.addmm(c_norms[:, None], c, part.T, alpha=-2)
        else:
            d = torch.addmm(c_norms, part, c.T, alpha=-2)
        if top > 2:
            distances[lo:lo + chunk], labels[lo:lo + chunk] = d.topk(top, dim=1, largest=False)
            continue
        for t in range(top):
            value, index = d.min(across)
            distances[lo:lo + chunk, t], labels[lo:lo + chunk, t] = value, index
            if t + 1 < top:
                d.scatter_(across, index.unsqueeze(across), float("inf"))
    distances += norms[:, None]
    return distances.clamp_min_(0), labels


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
    """Greedy k-means++ (scikit-learn's: of 2 + ln K candidates drawn ∝ D², the one lowering the potential
    most) on rank 0, broadcast: every rank starts from the same centroids.

    float64, as scikit-learn computes it, so that the thread count cannot change a draw; but on a float64
    copy of the sample, where scikit-learn re-converts float32 rows at every step (most of K=500's time).
    """
    if _rank() == 0:
        rng = np.random.default_rng(seed)
        x = sample.double()
        norms = torch.linalg.vector_norm(x, dim=1).square()
        chosen = [int(rng.integers(len(x)))]
        closest = (norms + norms[chosen[0]] - 2 * (x @ x[chosen[0]])).clamp_min_(0)
        d = torch.empty(2 + int(np.log(k)), len(x), dtype=torch.float64, device=x.device)
        for _ in range(1, k):
            draws = torch.from_numpy(rng.uniform(size=len(d))).to(x.device) * closest.sum()
            ids = torch.searchsorted(closest.cumsum(0), draws).clamp_max_(len(x) - 1)
            torch.addmm(norms, x[ids], x.T, alpha=-2, out=d).add_(norms[ids, None]).clamp_min_(0)
            best = int(torch.minimum(d, closest, out=d).sum(1).argmin())
            chosen.append(int(ids[best]))
            closest.copy_(d[best])
        centroids = sample[chosen].float().contiguous()
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
