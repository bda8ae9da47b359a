"""The clustering stage: pseudo_labels.npy rows follow dataset indices, on 1 or 2 ranks, and resumes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from ranks import run_ranks

from advcl_dist.cluster import CLUSTERS, PSEUDO_LABELS, cluster
from advcl_dist.config import Config, ConfigError, load_config, to_yaml
from advcl_dist.data import get_dataset
from advcl_dist.models import build_model

# Solid colours, none a multiple of another: a bias-free ReLU network maps c·x to c·f(x), and the
# L2-normalised features of two proportional colours would coincide.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
N = 23  # two ranks get 11 and 12 images


def write_colour_folder(root):
    """N solid-colour PNGs over two class folders, colours in no pattern the index order would follow."""
    colour_of = np.random.default_rng(7).integers(0, len(COLOURS), N)
    for i, c in enumerate(colour_of):
        folder = root / "train" / ("a" if i % 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), COLOURS[c], dtype=np.uint8)).save(folder / f"{i:03d}.png")


def write_fpre(path):
    torch.manual_seed(0)
    net = build_model("resnet18", width=8, proj_dim=16)
    cfg = Config()
    cfg.model.arch, cfg.model.width = "resnet18", 8
    torch.save({"model": net.state_dict(), "config": to_yaml(cfg), "method": "simclr", "step": 1}, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    write_colour_folder(root / "data")
    write_fpre(root / "fpre.pt")
    return root


def overrides(root, out):
    return [f"out_dir={out}", "data.name=imagefolder", f"data.root={root / 'data'}", "views.size=8",
            f"pseudo.fpre={root / 'fpre.pt'}", "pseudo.ks=[2,4]", "pseudo.iters=5", "eval.batch_size=5",
            "train.device=cpu"]


def _stage(args):
    cluster(load_config(None, args))


def colour_groups(root):
    """Dataset index → colour id, read from the images get_dataset returns (the independent reference)."""
    dataset = get_dataset("imagefolder", "train", str(root / "data"))
    return np.array([COLOURS.index(tuple(int(v) for v in dataset[i][0][:, 0, 0])) for i in range(len(dataset))])


def same_partition(a, b):
    return all((a == a[i]).tolist() == (b == b[i]).tolist() for i in range(len(a)))


@pytest.mark.distributed
def test_pseudo_labels_follow_dataset_indices_on_one_and_two_ranks(setup):
    groups = colour_groups(setup)
    cluster(load_config(None, overrides(setup, setup / "one")))
    run_ranks(2, _stage, overrides(setup, setup / "two"))
    one = np.load(setup / "one" / PSEUDO_LABELS)
    two = np.load(setup / "two" / PSEUDO_LABELS)
    assert one.dtype == np.int32 and one.shape == (N, 2)
    np.testing.assert_array_equal(two, one)
    assert same_partition(one[:, 1], groups)  # K=4: exactly the four colours, row i = dataset index i
    assert all(len(set(one[groups == g, 0])) == 1 for g in range(len(COLOURS)))  # K=2 merges whole colours
    stats = json.loads((setup / "two" / CLUSTERS).read_text())
    assert sorted(stats["clusters"]["4"]["sizes"]) == sorted(np.bincount(groups).tolist())
    assert stats["clusters"]["4"]["inertia"] < 1e-6  # identical features per colour
    assert stats["n"] == N and stats["world_size"] == 2 and stats["fpre"]["kind"] == "advcl-dist"
    assert json.loads((setup / "two" / "run.json").read_text())["world_size"] == 2
    centroids = np.load(setup / "two" / "centroids.npz")
    assert centroids["K4"].shape == (4, stats["feature_dim"]) and centroids["K2"].shape[0] == 2
    assert sorted(p.name for p in (setup / "two" / "features").iterdir()) == [
        "000000000-000000011.npy", "000000011-000000023.npy", "key.json"]


def test_a_requeued_job_reads_its_feature_shards_back(setup, monkeypatch):
    out = setup / "requeued"
    cluster(load_config(None, overrides(setup, out)))
    shard = out / "features" / "000000000-000000023.npy"
    stamp = shard.stat().st_mtime_ns
    first = np.load(out / PSEUDO_LABELS)
    (out / CLUSTERS).unlink()  # as if the job died before finishing

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although the features are cached")

    monkeypatch.setattr("advcl_dist.cluster.features.extract_features", no_encoder)
    cluster(load_config(None, overrides(setup, out) + ["pseudo.ks=[3]"]))
    assert shard.stat().st_mtime_ns == stamp
    assert np.load(out / PSEUDO_LABELS).shape == (N, 1) and first.shape == (N, 2)
    assert json.loads((out / CLUSTERS).read_text())["ks"] == [3]


def test_clear_errors(setup, tmp_path):
    with pytest.raises(ConfigError, match="pseudo.ks.*K=50.*23 images"):
        cluster(load_config(None, overrides(setup, tmp_path) + ["pseudo.ks=[50]"]))
    with pytest.raises(ConfigError, match="pseudo.fpre is not set"):
        cluster(load_config(None, overrides(setup, tmp_path) + ["pseudo.fpre=null"]))
    with pytest.raises(ConfigError, match="pseudo.init"):
        load_config(None, overrides(setup, tmp_path) + ["pseudo.init=farthest"])
    assert not (tmp_path / PSEUDO_LABELS).exists()


@pytest.mark.distributed
def test_pseudo_labels_from_a_beton_on_two_ranks_equal_the_torchvision_ones(setup):
    """The stage reads data.beton with FFCV (each rank its block of indices) and labels the same rows."""
    from advcl_dist.data.ffcv_writer import write_beton

    beton = write_beton(get_dataset("imagefolder", "train", str(setup / "data")), setup / "train.beton",
                        workers=1, info={"dataset": "imagefolder", "split": "train"})
    cluster(load_config(None, overrides(setup, setup / "tv")))
    run_ranks(2, _stage, [*overrides(setup, setup / "ffcv"), f"data.beton={beton}", "data.workers=1"])
    np.testing.assert_array_equal(np.load(setup / "ffcv" / PSEUDO_LABELS), np.load(setup / "tv" / PSEUDO_LABELS))
    assert json.loads((setup / "ffcv" / "features" / "key.json").read_text())["beton"] == str(beton)
