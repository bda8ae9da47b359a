"""f_pre loading (ours / torchvision ResNet-50), ordered and sharded feature extraction with its cache, global PCA."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from ranks import run_ranks
from sklearn.decomposition import PCA
from torch.utils.data import Dataset, Subset

from advcl_dist.cluster import extract_features
from advcl_dist.cluster.features import load_fpre, pca, shard_features, shard_range
from advcl_dist.config import Config, ConfigError, to_yaml
from advcl_dist.distributed import distributed_session
from advcl_dist.models import BACKBONES, build_model


class Images(Dataset):
    """Distinct random uint8 images [3, S, S] with labels: the get_dataset contract."""

    def __init__(self, n: int, size: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 3


class Raises(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the encoder ran although the cache covers this shard")


def randomise_bn(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN affine parameters and running statistics, so that loading the wrong ones shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def tiny_encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    encoder = BACKBONES["resnet18"](4, ("normal",))
    with torch.no_grad():
        randomise_bn(encoder, seed)
    return encoder


def test_shard_ranges_are_contiguous_cover_all_rows_and_are_balanced():
    for n in (0, 1, 5, 10, 11, 1000, 50_001):
        for world in (1, 2, 3, 7, 16):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        randomise_bn(net, 1)
    path = tmp_path_factory.mktemp("r50") / "resnet50.pth"
    torch.save(net.state_dict(), path)
    return path, net


def torchvision_reference(net, x):
    """torchvision's own model, fc removed, on inputs normalised the way its ImageNet weights expect."""
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
    ref = torchvision.models.resnet50(weights=None)
    ref.load_state_dict(net.state_dict())
    ref.fc = torch.nn.Identity()
    return ref.eval()(torchvision.transforms.functional.normalize(x, weights.mean, weights.std))


@torch.no_grad()
def test_load_fpre_torchvision_resnet50_plain_and_ddp_wrapped(resnet50_file, tmp_path):
    path, net = resnet50_file
    wrapped = tmp_path / "ddp.pth"
    state = {"module." + k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = torchvision_reference(net, x)
    for file in (path, wrapped):
        encoder, info = load_fpre(file, torch.device("cpu"))
        assert not encoder.training
        features = encoder(x)
        assert features.shape == (2, 2048)
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
        assert info == {"checkpoint": str(file.resolve()), "kind": "torchvision-resnet50", "method": None,
                        "arch": "resnet50"}


def test_load_fpre_rejects_files_that_are_not_an_fpre(resnet50_file, tmp_path):
    path, net = resnet50_file
    with pytest.raises(FileNotFoundError, match="pseudo.fpre"):
        load_fpre(tmp_path / "missing.pt", "cpu")
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"linear.weight": torch.zeros(2, 2)}, unrelated)
    truncated = tmp_path / "truncated.pt"
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("layer4.")}, truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a torch file")
    for bad, why in ((unrelated, "ResNet-50"), (truncated, "missing .*layer4"), (garbage, "cannot be read")):
        with pytest.raises(ConfigError, match=f"pseudo.fpre[=:].*{why}"):
            load_fpre(bad, "cpu")


@torch.no_grad()
def test_load_fpre_our_checkpoint_uses_the_normal_bn_branch(tmp_path):
    torch.manual_seed(0)
    net = build_model("resnet18", width=8, proj_dim=16)
    for seed, branch in enumerate(("normal", "pgd", "pgd_ce")):  # distinct statistics per branch
        for m in net.encoder.modules():
            if hasattr(m, "bns"):
                randomise_bn(m.bns[branch], seed)
    cfg = Config()
    cfg.model.arch, cfg.model.width = "resnet18", 8
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "config": to_yaml(cfg), "method": "advcl", "step": 7}, path)

    encoder, info = load_fpre(path, torch.device("cpu"))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    net.encoder.eval()
    expected = net.encoder(x, (("normal", 3),))
    other_branch = net.encoder(x, (("pgd", 3),))
    features = encoder(x)
    assert not encoder.training and features.shape == (3, 64)
    torch.testing.assert_close(features, expected)
    assert not torch.allclose(features, other_branch)
    assert info["kind"] == "advcl-dist" and info["checkpoint"] == str(path.resolve())
    assert (info["method"], info["arch"], info["width"], info["step"]) == ("advcl", "resnet18", 8, 7)


@torch.no_grad()
def per_image_features(encoder, dataset) -> torch.Tensor:
    """One image at a time, eval mode: the reference for batched, ordered extraction."""
    encoder.eval()
    return torch.cat([F.normalize(encoder(dataset[i][0][None].float() / 255), dim=1) for i in range(len(dataset))])


def test_extract_features_rows_follow_dataset_indices_and_have_unit_norm():
    encoder, data = tiny_encoder(), Images(7)
    encoder.train()  # extract_features must switch to eval itself
    features = extract_features(encoder, data, 3, None, torch.device("cpu"))
    expected = per_image_features(encoder, data)
    assert features.dtype == torch.float32 and features.shape == (7, 32)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(7))
    subset = extract_features(encoder, Subset(data, [4, 1, 6]), 2, None, torch.device("cpu"))
    torch.testing.assert_close(subset, expected[[4, 1, 6]])


def shards(encoder, data, folder, key, world):
    parts = [shard_features(encoder, data, batch_size=4, image_size=None, device=torch.device("cpu"),
                            folder=folder, key=key, rank=r, world=world) for r in range(world)]
    assert [start for _, start in parts] == [shard_range(len(data), r, world)[0] for r in range(world)]
    return torch.cat([x for x, _ in parts])


def test_sharded_features_are_cached_and_reused_across_world_sizes(tmp_path):
    encoder, data = tiny_encoder(), Images(11)
    expected = per_image_features(encoder, data)
    key = {"fpre": "/runs/simclr/checkpoint.pt", "step": 5, "data": "digits/train", "n": 11, "image_size": None}
    torch.testing.assert_close(shards(encoder, data, None, key, 2), expected)  # no cache

    folder = tmp_path / "features"
    torch.testing.assert_close(shards(encoder, data, folder, key, 2), expected)
    assert sorted(p.name for p in folder.iterdir()) == ["000000000-000000005.npy", "000000005-000000011.npy",
                                                        "key.json"]
    # a requeued job reads the cache, at the same and at another world size (ranges straddle the old files)
    for world in (2, 3, 1):
        torch.testing.assert_close(shards(Raises(), data, folder, key, world), expected)

    # a hole in the cache: only the ranks whose range it covers may skip the encoder
    (folder / "000000005-000000011.npy").unlink()
    x, start = shard_features(Raises(), data, batch_size=4, image_size=None, device="cpu", folder=folder,
                              key=key, rank=0, world=3)
    torch.testing.assert_close(x, expected[:3])
    with pytest.raises(AssertionError, match="encoder ran"):
        shard_features(Raises(), data, batch_size=4, image_size=None, device="cpu", folder=folder, key=key,
                       rank=1, world=3)


def test_a_changed_key_makes_the_cache_stale(tmp_path):
    data, folder = Images(11), tmp_path / "features"
    key = {"fpre": "a.pt", "step": 5, "n": 11}
    shards(tiny_encoder(0), data, folder, key, 2)
    new_key, other = {**key, "step": 6}, tiny_encoder(1)
    with pytest.raises(AssertionError, match="encoder ran"):
        shards(Raises(), data, folder, new_key, 3)
    torch.testing.assert_close(shards(other, data, folder, new_key, 3), per_image_features(other, data))
    assert sorted(p.name for p in folder.glob("*.npy")) == ["000000000-000000003.npy", "000000003-000000007.npy",
                                                            "000000007-000000011.npy"]
    torch.testing.assert_close(shards(Raises(), data, folder, new_key, 2), per_image_features(other, data))


def pca_data() -> torch.Tensor:
    """Correlated columns of distinct scales: well separated eigenvalues, a non-zero mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 12, generator=g, dtype=torch.float64) * torch.linspace(3, 0.2, 12, dtype=torch.float64)
    return x @ torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0] + 0.5


def assert_equal_up_to_column_sign(actual: np.ndarray, expected: np.ndarray) -> None:
    signs = np.sign((actual * expected).sum(0))
    np.testing.assert_allclose(actual * signs, expected, atol=1e-6)


@pytest.mark.parametrize("whiten", [True, False])
def test_pca_matches_scikit_learn_followed_by_l2_normalisation(whiten):
    x = pca_data()
    reference = PCA(n_components=5, whiten=whiten).fit_transform(x.numpy())
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    out = pca(x, 5, whiten)
    assert out.shape == (60, 5) and out.dtype == torch.float64
    assert_equal_up_to_column_sign(out.numpy(), reference)
    assert_equal_up_to_column_sign(pca(x.float(), 5, whiten).double().numpy(), reference)  # float32 input


def test_pca_rejects_more_components_than_features_or_rows():
    for x, dim in ((pca_data(), 13), (pca_data()[:4], 5), (pca_data(), 0)):
        with pytest.raises(ConfigError, match="pseudo.pca"):
            pca(x, dim, True)


def pca_rank(splits, dim, whiten):
    with distributed_session("cpu"):
        rank = torch.distributed.get_rank()
        return pca(pca_data()[splits[rank]:splits[rank + 1]], dim, whiten).numpy()


@pytest.mark.distributed
def test_pca_over_uneven_shards_on_two_ranks_equals_single_process_pca():
    outputs = run_ranks(2, pca_rank, [0, 17, 60], 4, True)
    np.testing.assert_allclose(np.concatenate(outputs), pca(pca_data(), 4, True).numpy(), atol=1e-10)
