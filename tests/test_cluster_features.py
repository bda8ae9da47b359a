"""f_pre loading (ours / torchvision ResNet-50, other files refused), ordered and sharded feature extraction with
its cache, f_pre at its own resolution (pseudo.fpre_size), global PCA."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from ranks import run_ranks
from sklearn.decomposition import PCA
from torch.utils.data import Dataset, Subset
from unsafe_files import Payload

from advcl_dist.cluster import cluster, extract_features
from advcl_dist.cluster.features import load_fpre, pca, shard_features, shard_range
from advcl_dist.config import Config, ConfigError, load_config, to_yaml
from advcl_dist.data import get_dataset
from advcl_dist.distributed import distributed_session
from advcl_dist.engine.checkpoint import UnsafeFileError
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


# ---- pseudo.fpre_size: f_pre at its own resolution -------------------------------------------------------------

@torch.no_grad()
def per_image_resized_features(encoder, dataset, side) -> torch.Tensor:
    """The reference: each image on its own, resized by torchvision's resize (bilinear, antialiased)."""
    encoder.eval()
    rows = []
    for i in range(len(dataset)):
        image = torchvision.transforms.functional.resize(dataset[i][0].float() / 255, [side, side], antialias=True)
        rows.append(F.normalize(encoder(image[None]), dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("side", [20, 5])  # up (a CIFAR image for a 224-px f_pre) and down (antialiasing matters)
def test_resize_to_feeds_the_encoder_images_resized_like_torchvision(side):
    encoder, data = tiny_encoder(), Images(5, size=8)
    features = extract_features(encoder, data, 2, None, torch.device("cpu"), resize_to=side)
    torch.testing.assert_close(features, per_image_resized_features(encoder, data, side))
    assert not torch.allclose(features, per_image_features(encoder, data), atol=1e-3)
    cached, _ = shard_features(encoder, data, batch_size=3, image_size=None, device="cpu", folder=None, key={},
                               rank=1, world=2, resize_to=side)
    torch.testing.assert_close(cached, features[2:])


@torch.no_grad()
def test_torchvision_resnet50_fpre_sees_its_own_resolution(resnet50_file):
    path, net = resnet50_file
    encoder, _ = load_fpre(path, torch.device("cpu"))
    data = Images(2, size=8, seed=3)
    features = extract_features(encoder, data, 2, None, torch.device("cpu"), resize_to=40)
    resized = torch.stack([torchvision.transforms.functional.resize(data[i][0].float() / 255, [40, 40],
                                                                    antialias=True) for i in range(2)])
    torch.testing.assert_close(features, F.normalize(torchvision_reference(net, resized), dim=1),
                               rtol=1e-5, atol=1e-6)


def test_the_clustering_stage_passes_fpre_size_and_keys_its_cache_on_it(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "data" / "train" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data/train/a" / f"{i}.png")
    torch.manual_seed(0)
    net = build_model("resnet18", width=4, proj_dim=8)
    cfg = Config()
    cfg.model.arch, cfg.model.width = "resnet18", 4
    torch.save({"model": net.state_dict(), "config": to_yaml(cfg), "method": "simclr", "step": 1}, tmp_path / "f.pt")
    out = tmp_path / "out"
    args = [f"out_dir={out}", "data.name=imagefolder", f"data.root={tmp_path / 'data'}", "views.size=8",
            f"pseudo.fpre={tmp_path / 'f.pt'}", "pseudo.ks=[2]", "pseudo.iters=2", "train.device=cpu"]
    shard = out / "features" / "000000000-000000006.npy"
    cluster(load_config(None, args))
    assert "fpre_size" not in json.loads((out / "features" / "key.json").read_text())  # old caches stay valid
    at_8 = np.load(shard)
    cluster(load_config(None, [*args, "pseudo.fpre_size=16"]))
    assert json.loads((out / "features" / "key.json").read_text())["fpre_size"] == 16
    assert json.loads((out / "clusters.json").read_text())["fpre_size"] == 16
    encoder, _ = load_fpre(tmp_path / "f.pt", "cpu")
    dataset = get_dataset("imagefolder", "train", str(tmp_path / "data"))
    expected = per_image_resized_features(encoder, dataset, 16)
    np.testing.assert_allclose(np.load(shard), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.load(shard), at_8, atol=1e-3)


# ---- f_pre files of another kind -------------------------------------------------------------------------------

def test_fpre_files_of_another_kind_are_refused_naming_pseudo_fpre_and_what_it_must_be(resnet50_file, tmp_path):
    path, net = resnet50_file
    state = net.state_dict()
    ours = build_model("resnet18", width=4, proj_dim=8)
    files = {  # name: (content, what the message says about it)
        "classifier.pt": ({"model": ours.state_dict(), "classifier": {"arch": "resnet18", "width": 4}},
                          "is a finetuned classifier"),
        "results.json": ('{"dataset": "cifar10", "SA": 80.1, "RA": 50.2, "AA": null}', "cannot be read"),
        "features.npy": (np.zeros((3, 4), np.float32), "cannot be read"),
        "tensor.pt": (torch.zeros(3), "holds a Tensor"),
        "resnet18_state_dict.pt": (ours.state_dict(), "keys do not match a torchvision ResNet-50"),
        "narrow_resnet50.pt": ({k: (v[: v.shape[0] // 2] if k == "conv1.weight" else v) for k, v in state.items()},
                               r"not its shapes \(1 tensors, e.g. conv1.weight \(32, 3, 7, 7\) instead of "
                               r"\(64, 3, 7, 7\)\)"),
        "epoch_only.pt": ({"epoch": 3, "arch": "resnet50"}, "nor a state dict of tensors"),
    }
    for name, (content, why) in files.items():
        file = tmp_path / name
        if isinstance(content, str):
            file.write_text(content)
        elif isinstance(content, np.ndarray):
            np.save(file, content)
        else:
            torch.save(content, file)
        with pytest.raises(ConfigError) as error:
            load_fpre(file, "cpu")
        message = str(error.value)
        assert message.startswith(f"pseudo.fpre={file}") and "\n" not in message, (name, message)
        assert "pseudo.fpre must be a pretraining checkpoint.pt of this package" in message, name
        assert "classifier.pt or" not in message, name  # no advice to point f_pre at a classifier
        assert re.search(why, message), (name, message)
    marker = tmp_path / "ran"
    torch.save({"conv1.weight": Payload(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(UnsafeFileError, match=r"^pseudo.fpre: .*crafted.pt was refused"):
        load_fpre(tmp_path / "crafted.pt", "cpu")
    assert not marker.exists()


def test_fpre_size_must_be_a_positive_side_or_null():
    assert load_config(None, []).pseudo.fpre_size is None
    assert load_config(None, ["pseudo.fpre_size=224"]).pseudo.fpre_size == 224
    for bad in ("0", "-224"):
        with pytest.raises(ConfigError, match=r"config key 'pseudo.fpre_size': must be > 0"):
            load_config(None, [f"pseudo.fpre_size={bad}"])
