"""Distributed k-means: rank-count invariance, agreement with faiss, the DESIGN §3 contract."""
import faiss
import numpy as np
import pytest
import torch
from ranks import run_ranks
from sklearn.metrics import adjusted_rand_score

from advcl_dist.cluster import kmeans
from advcl_dist.cluster.kmeans import _kmeans_plusplus, assign, fit_kmeans, near_tie_bound, search_torch
from advcl_dist.distributed import distributed_session


def blobs(n=1500, centres=12, dim=16, spread=8.0, seed=0):
    """Well-separated Gaussian blobs: rows and their true blob."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)) * spread
    truth = rng.integers(0, centres, n)
    return (means[truth] + rng.normal(size=(n, dim))).astype(np.float32), truth


def duplicates():
    """Eight distinct points repeated unevenly: a random start often picks copies of one point, which
    leaves clusters empty and exercises the re-seeding."""
    base = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
    return np.repeat(base, [30, 30, 20, 20, 10, 10, 5, 5], axis=0)


CASES = {  # name: (data, K, init)
    "blobs-kmeans++": (lambda: blobs()[0], 12, "kmeans++"),
    "blobs-random": (lambda: blobs()[0], 12, "random"),
    "duplicates-random": (duplicates, 6, "random"),
}


SEED = 1
SPLITS = {2: [0, 0.3, 1], 3: [0, 0.2, 0.55, 1]}  # uneven shards, as fractions of each case's rows


def _bounds(n, world):
    return [round(f * n) for f in SPLITS[world]]


def _fit_shards(world):
    """Every case on this rank's contiguous block of rows."""
    out = {}
    with distributed_session("cpu") as info:
        for case, (make, k, init) in CASES.items():
            x = make()
            lo, hi = _bounds(len(x), world)[info.rank:info.rank + 2]
            r = fit_kmeans(torch.from_numpy(x[lo:hi]), k, iters=10, seed=SEED, init=init)
            out[case] = (r.centroids.numpy(), r.labels.numpy(), r.inertia, r.sizes, r.reseeded, r.iterations)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_with_uneven_shards_equal_one_process(world):
    ranks = run_ranks(world, _fit_shards, world)
    for case, (make, k, init) in CASES.items():
        x = make()
        one = fit_kmeans(torch.from_numpy(x), k, iters=10, seed=SEED, init=init)
        if case.startswith("duplicates"):
            assert one.reseeded > 0, "the case should leave clusters empty"
        parts = [r[case] for r in ranks]
        assert [len(p[1]) for p in parts] == np.diff(_bounds(len(x), world)).tolist()
        for centroids, *_ in parts:  # integer (fixed-point) sums: the same bits, whatever the split
            np.testing.assert_array_equal(centroids, one.centroids.numpy(), err_msg=case)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), one.labels.numpy(), err_msg=case)
        for _, _, inertia, sizes, reseeded, iterations in parts:
            assert inertia == pytest.approx(one.inertia, rel=1e-9)
            assert sizes == one.sizes and reseeded == one.reseeded and iterations == one.iterations


def test_inertia_within_one_percent_of_faiss_on_separated_blobs():
    x, truth = blobs(n=2000, centres=8, spread=20.0, seed=5)
    # Random starts rarely cover all 8 blobs, so faiss needs many restarts to find the optimum. One thread:
    # OpenMP's two threads on rows this few spend 100× longer synchronising than computing.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        reference = faiss.Kmeans(x.shape[1], 8, niter=20, seed=0, nredo=100, max_points_per_centroid=len(x))
        reference.train(x)
    finally:
        faiss.omp_set_num_threads(threads)
    faiss_inertia = float(reference.index.search(x, 1)[0].sum())
    result = fit_kmeans(x, 8, iters=20, seed=0)
    assert abs(result.inertia - faiss_inertia) <= 0.01 * faiss_inertia
    assert adjusted_rand_score(truth, result.labels.numpy()) == pytest.approx(1.0)
    # The reported inertia is the sum of squared distances to the returned centroids (float64 reference).
    d = ((x[:, None, :].astype(np.float64) - result.centroids.numpy()[None].astype(np.float64)) ** 2).sum(-1)
    assert result.inertia == pytest.approx(d.min(1).sum(), rel=1e-5)
    np.testing.assert_array_equal(result.labels.numpy(), d.argmin(1))
    assert result.sizes == np.bincount(d.argmin(1), minlength=8).tolist()


def test_lloyd_iterations_match_faiss_from_the_same_start():
    x, _ = blobs(n=1200, centres=10, spread=3.0, seed=2)  # overlapping blobs: many iterations do move
    ours = fit_kmeans(x, 10, iters=15, init="random", seed=0)
    generator = torch.Generator().manual_seed(0)
    start = x[torch.randperm(len(x), generator=generator)[:10].numpy()]  # our random init: by global index
    reference = faiss.Kmeans(x.shape[1], 10, niter=15, max_points_per_centroid=len(x), update_index=True)
    reference.train(x, init_centroids=start)
    np.testing.assert_allclose(ours.centroids.numpy(), reference.centroids, rtol=0, atol=1e-4)


def test_contract_accepts_numpy_and_tensors_and_returns_tensors():
    x, _ = blobs(n=300, centres=4, seed=4)
    for data in (x, torch.from_numpy(x), torch.from_numpy(x.astype(np.float64))):
        centroids, labels = kmeans(data, 4)
        assert isinstance(centroids, torch.Tensor) and centroids.shape == (4, x.shape[1])
        assert centroids.dtype == torch.float32
        assert isinstance(labels, torch.Tensor) and labels.shape == (300,) and labels.dtype == torch.int64
    first, second = kmeans(x, 4, seed=7), kmeans(x, 4, seed=7)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_bad_arguments_are_clear_errors():
    x, _ = blobs(n=20, centres=2)
    with pytest.raises(ValueError, match="K=21"):
        kmeans(x, 21)
    with pytest.raises(ValueError, match="rows"):
        kmeans(x[0], 2)
    with pytest.raises(ValueError, match="init"):
        fit_kmeans(x, 2, init="kmeans||")


def near_ties(n=4000, k=8, dim=64, seed=0):
    """Rows moved onto the bisector of their two nearest centroids, then off it by about 1e-7: float32
    distances cannot tell which is nearer, float64 distances can."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, dim)).astype(np.float32)
    c64, x = c.astype(np.float64), rng.normal(size=(n, dim))
    a, b = np.argsort(((x[:, None] - c64[None]) ** 2).sum(-1), 1)[:, :2].T
    normal, middle = c64[b] - c64[a], (c64[a] + c64[b]) / 2
    x -= (((x - middle) * normal).sum(1) / (normal ** 2).sum(1))[:, None] * normal
    x += normal * rng.uniform(-1e-7, 1e-7, (n, 1))
    return x.astype(np.float32), c


def test_assignment_is_the_float64_nearest_centroid_whatever_rows_share_the_call():
    x, c = near_ties()
    exact = ((x[:, None].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(c)
    assert (index.search(x, 1)[1][:, 0] != exact).sum() > 10, "float32 ranking should get some rows wrong"
    _, labels = assign(torch.from_numpy(x), torch.from_numpy(c))
    np.testing.assert_array_equal(labels.numpy(), exact)
    splits = ((0, 7), (7, 1500), (1500, 4000))
    pieces = [assign(torch.from_numpy(x[lo:hi]), torch.from_numpy(c))[1] for lo, hi in splits]
    np.testing.assert_array_equal(torch.cat(pieces).numpy(), exact)
    # An exact tie (two identical centroids) goes to the lower index.
    _, labels = assign(torch.from_numpy(x), torch.from_numpy(np.concatenate([c[:1], c])))
    assert (labels.numpy() != 1).all() and (labels.numpy() == 0).sum() == (exact == 0).sum()


def test_torch_search_matches_faiss():
    x, _ = blobs(n=500, centres=6, seed=6)
    centroids = torch.from_numpy(x[:6].copy())
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(centroids.numpy())
    d_faiss, l_faiss = index.search(x, 2)
    d_torch, l_torch = search_torch(torch.from_numpy(x), centroids, top=2, chunk=128)
    np.testing.assert_array_equal(l_torch.numpy(), l_faiss)
    np.testing.assert_allclose(d_torch.numpy(), d_faiss, rtol=1e-4, atol=1e-3)


def test_a_converged_run_stops_early_with_the_result_of_every_iteration():
    x, _ = blobs(n=1500, centres=6, spread=10.0, seed=8)
    ours = fit_kmeans(x, 6, iters=40, init="random", seed=0)
    assert ours.iterations < 40, "separated blobs should reach a fixed point well before 40 iterations"
    start = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:6].numpy()]
    reference = faiss.Kmeans(x.shape[1], 6, niter=40, max_points_per_centroid=len(x))  # all 40 iterations
    reference.train(x, init_centroids=start)
    np.testing.assert_allclose(ours.centroids.numpy(), reference.centroids, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(ours.labels.numpy(), reference.index.search(x, 1)[1][:, 0])
    # The fixed-point sums give the float64 means of the rows, rounded once to float32.
    means = np.stack([x[ours.labels.numpy() == j].astype(np.float64).mean(0) for j in range(6)])
    np.testing.assert_array_max_ulp(ours.centroids.numpy(), means.astype(np.float32), maxulp=1)


@pytest.mark.parametrize("dim", [16, 2048])
def test_the_near_tie_bound_covers_the_float32_distance_error(dim):
    """Each float32 distance is within half the gap bound of the float64 one (then no gap wider than the
    bound can be misranked), for D where the 1e-4 floor applies and where the derived bound does."""
    rng = np.random.default_rng(dim)
    x, c = (rng.normal(size=(n, dim)).astype(np.float32) * s for n, s in ((3000, 3.0), (50, 1.0)))
    d, idx = search_torch(torch.from_numpy(x), torch.from_numpy(c), top=2)
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    exact = ((x64[:, None] - c64[idx.numpy()]) ** 2).sum(-1)
    scale = (x64 ** 2).sum(1, keepdims=True) + (c64 ** 2).sum(1).max()
    assert (np.abs(d.numpy() - exact) / scale).max() <= near_tie_bound(dim) / 2


def test_kmeans_plusplus_seeds_like_scikit_learn():
    from sklearn.cluster import kmeans_plusplus

    x, truth = blobs(n=2000, centres=8, spread=20.0, seed=5)
    for seed in range(3):  # separated blobs: one seed in each
        chosen = [np.flatnonzero((x == row).all(1))[0] for row in _kmeans_plusplus(torch.from_numpy(x), 8, seed)]
        assert sorted(truth[chosen]) == list(range(8))
    x, _ = blobs(n=3000, centres=30, spread=2.0, seed=11)  # overlapping: about scikit-learn's potential

    def potential(c):
        return ((x[:, None].astype(np.float64) - np.asarray(c, np.float64)[None]) ** 2).sum(-1).min(1).sum()

    ratios = [potential(_kmeans_plusplus(torch.from_numpy(x), 20, seed).numpy())
              / potential(kmeans_plusplus(x, 20, random_state=seed)[0]) for seed in range(8)]
    assert 0.95 < np.mean(ratios) < 1.05


def test_bench_inertia_is_the_float64_sum_over_nearest_centroids():
    from advcl_dist.bench.kmeans import inertia

    x, _ = blobs(n=800, centres=5, seed=9)
    value, sizes = inertia(x, x[:5])
    d = ((x[:, None].astype(np.float64) - x[None, :5].astype(np.float64)) ** 2).sum(-1)
    assert value == pytest.approx(d.min(1).sum(), rel=1e-6)
    assert sizes == np.bincount(d.argmin(1), minlength=5).tolist()


def test_bench_faiss_from_our_start_ends_at_our_inertia(tmp_path):
    """`tools/bench.py kmeans`'s faiss-our-start row runs faiss's Lloyd iterations from our k-means++ centroids:
    the same start and the same updates, so the same inertia as ours (up to float32 sums), while faiss
    from its own random start may end elsewhere."""
    import argparse

    from advcl_dist.bench import kmeans as bench

    args = argparse.Namespace(rows=6000, dim=16, centres=40, seed=3, ks=[5, 40], iters=10, procs=[1],
                              device="cpu", cache=str(tmp_path), faiss=True, sklearn=False, json=None)
    report = bench.main(args)
    assert set(report["runs"]) == {"ours-1p", *bench.FAISS_RUNS}
    for k in ("5", "40"):
        assert abs(report["ours_1p_vs_faiss"]["inertia_same_start"][k]) < 1e-5
        assert report["runs"]["faiss-our-start"]["stats"][k]["iterations"] == 10
