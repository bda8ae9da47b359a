"""The FFCV path against the torchvision path and against FFCV's own distributed order.

FFCV is installed by `make install`; a missing FFCV fails this module's import instead of skipping it.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import ffcv  # noqa: F401  (a hard requirement of these tests)
import numpy as np
import pytest
import torch
from PIL import Image

from advcl_dist.config import ConfigError, load_config
from advcl_dist.data import DatasetNotFoundError, build_loader, get_dataset
from advcl_dist.data.datasets import TensorImageDataset
from advcl_dist.data.ffcv_loader import BetonError, build_ffcv_loader, read_beton
from advcl_dist.data.ffcv_support import FFCVNotInstalledError
from advcl_dist.data.ffcv_writer import BetonWriteError, info_path, write_beton
from advcl_dist.data.loader import resize_center_crop
from advcl_dist.data.source import training_data
from advcl_dist.distributed import init_distributed
from tests.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def random_set(n=50, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(-1, 10, (n,), generator=g)
    return TensorImageDataset(images, labels)


def epoch(loader, epoch_number=0, start_batch=0):
    """All batches of one epoch as CPU copies (FFCV reuses its output buffers)."""
    loader.set_epoch(epoch_number, start_batch)
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_raw_beton_round_trip_is_bit_exact(tmp_path):
    data = random_set(n=50)
    path = write_beton(data, tmp_path / "x.beton", workers=2, chunk_size=7)
    assert not (tmp_path / "x.beton.partial").exists()
    images, labels, indices = map(torch.cat, zip(*epoch(build_ffcv_loader(path, 16, shuffle=False,
                                                                          drop_last=False, workers=2))))
    assert images.dtype == torch.uint8 and labels.dtype == indices.dtype == torch.int64
    assert torch.equal(indices, torch.arange(50))  # sample i is dataset index i
    assert torch.equal(images, data.images) and torch.equal(labels, data.labels)  # -1 (unlabelled) kept
    info = read_beton(path)
    assert info.num_samples == 50 and info.fixed_size == 32 and np.array_equal(info.labels, data.labels.numpy())
    assert json.loads(info_path(path).read_text())["write_mode"] == "raw"


def test_ffcv_leaves_torch_threads_alone_and_caps_its_threads_at_numbas(tmp_path):
    """FFCV sets torch's threads to its own; more decode threads than numba has would raise in numba."""
    import numba

    path = write_beton(random_set(n=20), tmp_path / "x.beton", workers=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loader = build_ffcv_loader(path, 8, shuffle=True, drop_last=False, workers=1000)
        assert sum(len(b[0]) for b in epoch(loader)) == 20
        assert torch.get_num_threads() == 1
        assert loader._dataloader.num_workers == numba.config.NUMBA_NUM_THREADS
    finally:
        torch.set_num_threads(before)


def test_leaving_an_epoch_early_stops_ffcvs_decode_thread(tmp_path):
    """A step limit ends the loop mid-epoch; FFCV's thread must not run on (it can abort the exit)."""
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator

    path = write_beton(random_set(n=200), tmp_path / "x.beton", workers=1)
    batches = iter(build_ffcv_loader(path, 8, shuffle=True, drop_last=True, workers=1))
    next(batches)
    assert any(isinstance(t, EpochIterator) for t in threading.enumerate())
    batches.close()  # what leaving a for loop does to the generator
    assert not any(isinstance(t, EpochIterator) and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("world", [1, 2])
def test_ffcv_batches_equal_the_torchvision_loaders_including_a_mid_epoch_resume(tmp_path, world):
    """Same images, labels and indices in the same order for every rank, epoch and skipped prefix."""
    data = get_dataset("digits", "test")
    path = write_beton(data, tmp_path / "digits.beton", workers=2)
    for rank in range(world):
        tv = build_loader(data, 32, shuffle=True, drop_last=True, seed=5, rank=rank, world_size=world)
        ff = build_ffcv_loader(path, 32, shuffle=True, drop_last=True, seed=5, rank=rank, world_size=world,
                               workers=2)
        assert ff.batches_per_epoch == tv.batches_per_epoch
        for e, skip in [(0, 0), (3, 2)]:
            a, b = epoch(tv, e, skip), epoch(ff, e, skip)
            assert len(a) == len(b) == len(ff) == tv.batches_per_epoch - skip
            for x, y in zip(a, b):
                assert all(torch.equal(u, v) for u, v in zip(x, y))
        assert [t.tolist() for t in epoch(ff, 3, 2)[0]] == [t.tolist() for t in epoch(ff, 3)[2]]


def smooth_images(root, sizes):
    """An ImageFolder of smooth images of different sizes (PNG, so the torchvision path is lossless)."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        coeff = rng.uniform(-1, 1, size=(3, 3))
        hwc = np.stack([127 + 120 * np.sin(3 * c[0] * yy + 2 * c[1] * xx + c[2]) for c in coeff], axis=-1)
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(hwc.round().astype(np.uint8)).save(folder / f"{i}.png")


@pytest.mark.parametrize("mode,tolerance", [("raw", 2.0), ("jpg", 2.5)])
def test_variable_size_images_decode_to_the_torchvision_base_image(tmp_path, mode, tolerance):
    """FFCV crops the central square and resizes it (OpenCV); torchvision resizes, then crops: same image
    up to interpolation (and JPEG) differences, measured as the mean absolute difference in 0..255."""
    smooth_images(tmp_path, [(80, 120), (100, 64), (96, 96), (70, 90), (128, 100), (64, 64)])
    data = get_dataset("imagefolder", "train", tmp_path)
    path = write_beton(data, tmp_path / "f.beton", write_mode=mode, jpeg_quality=95, workers=2)
    with pytest.raises(BetonError, match="data.image_size"):
        build_ffcv_loader(path, 4, shuffle=False, drop_last=False)
    (images, labels, indices), = epoch(build_ffcv_loader(path, 6, shuffle=False, drop_last=False, image_size=48))
    assert images.shape == (6, 3, 48, 48) and labels.tolist() == [data[i][1] for i in indices.tolist()]
    references = [resize_center_crop(data[i][0], 48).float() for i in indices.tolist()]
    for i, image in enumerate(images.float()):
        assert (image - references[i]).abs().mean() < tolerance, i
        assert (image - references[i - 1]).abs().mean() > 10 * tolerance  # another image is far off


def _distributed_epochs(path, out):
    """Rank r: our indices for epochs 0 and 1, and the order FFCV's own RANDOM distributed loader draws."""
    from ffcv.loader import Loader, OrderOption

    dist = init_distributed("cpu")
    ours = build_ffcv_loader(path, 8, shuffle=True, drop_last=False, seed=7, rank=dist.rank,
                             world_size=dist.world_size, workers=1)
    theirs = Loader(str(path), batch_size=8, num_workers=1, order=OrderOption.RANDOM, distributed=True, seed=7)
    record = {e: {"ours": torch.cat([b[2] for b in epoch(ours, e)]).tolist(),
                  "ffcv": [int(i) for i in theirs.traversal_order.sample_order(e)]} for e in (0, 1)}
    (Path(out) / f"rank{dist.rank}.json").write_text(json.dumps(record))


@pytest.mark.distributed
def test_two_ranks_see_every_index_exactly_once_per_epoch_in_ffcvs_distributed_order(tmp_path):
    path = write_beton(random_set(n=60, size=8), tmp_path / "x.beton", workers=1)
    run_ranks(2, _distributed_epochs, str(path), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for e in ("0", "1"):
        seen = ranks[0][e]["ours"] + ranks[1][e]["ours"]
        assert sorted(seen) == list(range(60))  # every index once, none twice
        assert all(r[e]["ours"] == r[e]["ffcv"] for r in ranks)
    assert ranks[0]["0"]["ours"] != ranks[0]["1"]["ours"]  # reshuffled every epoch


class Failing(TensorImageDataset):
    def __getitem__(self, index):
        if index == 37:
            raise OSError("truncated file")
        return super().__getitem__(index)


def test_a_sample_that_cannot_be_read_stops_the_writer_with_its_index_and_leaves_no_file(tmp_path):
    good = random_set(n=80)
    with pytest.raises(BetonWriteError, match="sample 37.*truncated file"):
        write_beton(Failing(good.images, good.labels), tmp_path / "x.beton", workers=2, chunk_size=5)
    assert list(tmp_path.iterdir()) == []


class Interrupting(TensorImageDataset):
    """Presses Ctrl-C (SIGINT to the writing process) while FFCV's workers are reading sample 5."""

    def __init__(self, images, labels):
        super().__init__(images, labels)
        self.writer_pid = os.getpid()

    def __getitem__(self, index):
        if index == 5:
            os.kill(self.writer_pid, signal.SIGINT)
        return super().__getitem__(index)


def test_an_interrupted_write_leaves_no_file_and_no_folder_behind(tmp_path):
    data = random_set(n=200)
    # Ctrl-C as a terminal delivers it, whatever handler an earlier test in this worker process left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_beton(Interrupting(data.images, data.labels), tmp_path / "new" / "x.beton", workers=2,
                        chunk_size=5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(tmp_path.iterdir()) == []


def write_ffcv(*args):
    return subprocess.run([sys.executable, "tools/write_ffcv.py", "--dataset", "digits", "--workers", "1", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _unwritable(tmp_path):
    return Path("/proc/advcl-test.beton"), "cannot write into /proc"


def _a_folder(tmp_path):
    (tmp_path / "betons").mkdir()
    return tmp_path / "betons", f"--out {tmp_path / 'betons'} is a folder"


def _an_existing_file(tmp_path):
    (tmp_path / "x.beton").write_text("an earlier file")
    return tmp_path / "x.beton", "exists; pass --overwrite to replace it"


def _under_a_file(tmp_path):
    (tmp_path / "notes").write_text("")
    return tmp_path / "notes" / "x.beton", f"{tmp_path / 'notes'} is a file, not a folder"


@pytest.mark.parametrize("out", [_a_folder, _an_existing_file, _under_a_file, _unwritable])
def test_write_ffcv_refuses_a_bad_out_before_reading_anything(tmp_path, out):
    """One line, exit code 2, and nothing written or changed, before the dataset is read."""
    path, message = out(tmp_path)
    before = sorted((p, p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    run = write_ffcv("--split", "test", "--out", str(path))
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [run.stderr.strip()], run.stderr
    assert run.stderr.startswith("error: ") and message in run.stderr and "[write_ffcv]" not in run.stdout
    assert sorted((p, p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")) == before


def test_training_data_picks_ffcv_for_a_beton_and_checks_it(tmp_path, monkeypatch):
    path = write_beton(get_dataset("digits", "test"), tmp_path / "t.beton", workers=2,
                       info={"dataset": "digits", "split": "test"})
    cfg = load_config(None, ["data.name=digits", "data.split=test", f"data.beton={path}", "data.workers=1"])
    data = training_data(cfg.data, 32, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    assert data.num_samples == 360 and data.num_classes == 10 and "FFCV" in data.description
    tv = training_data(load_config(None, ["data.name=digits", "data.split=test", f"data.beton={path}",
                                          "data.format=torchvision"]).data, 32, seed=0, rank=0, world_size=1,
                       device=torch.device("cpu"))
    assert tv.description == "torchvision"

    with pytest.raises(ConfigError, match="data.split is 'train'"):  # another split's file
        training_data(load_config(None, ["data.name=digits", f"data.beton={path}"]).data, 32, seed=0, rank=0,
                      world_size=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.format.*needs data.beton"):
        load_config(None, ["data.format=ffcv"])
    with pytest.raises(DatasetNotFoundError, match="data.beton.*write_ffcv.py"):
        read_beton(tmp_path / "missing.beton")
    (tmp_path / "junk.beton").write_bytes(b"not a beton at all")
    with pytest.raises(BetonError, match="not a readable FFCV"):
        read_beton(tmp_path / "junk.beton")
    monkeypatch.setitem(sys.modules, "ffcv", None)  # as if FFCV were not installed
    with pytest.raises(FFCVNotInstalledError, match="make install.*data.format=torchvision"):
        training_data(cfg.data, 32, seed=0, rank=0, world_size=1, device=torch.device("cpu"))


@pytest.mark.integration
def test_write_ffcv_tool_writes_the_dataset_and_a_description(tmp_path):
    out = tmp_path / "d.beton"
    out.write_text("an earlier file")  # replaced with --overwrite (refused without it: see below)
    run = subprocess.run([sys.executable, "tools/write_ffcv.py", "--dataset", "digits", "--split", "test",
                          "--out", str(out), "--workers", "2", "--overwrite"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert read_beton(out).num_samples == 360
    written = json.loads(info_path(out).read_text())
    assert written["dataset"] == "digits" and written["split"] == "test" and written["num_samples"] == 360
    assert written["write_mode"] == "raw" and written["classes"] == [str(d) for d in range(10)]
    bad = subprocess.run([sys.executable, "tools/write_ffcv.py", "--dataset", "cifar10", "--split", "train",
                          "--out", str(tmp_path / "c.beton")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--root" in bad.stderr and not (tmp_path / "c.beton").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.beton", "d.beton.json"]


@pytest.mark.integration
def test_pretraining_from_a_beton_resumed_mid_epoch_matches_the_torchvision_run(tmp_path, capsys):
    """Same batches, so the same losses: 14 steps cross an epoch boundary (11 steps per epoch), and the
    FFCV run crashes at step 10 and resumes from its step-8 checkpoint, in the middle of the first epoch."""
    from advcl_dist.engine import Trainer
    from tests.test_engine import Crash, crash_at, losses, tiny_cfg

    path = write_beton(get_dataset("digits", "train"), tmp_path / "d.beton", workers=2,
                       info={"dataset": "digits", "split": "train"})
    Trainer(tiny_cfg(tmp_path / "tv", "train.ckpt_every=100")).fit(stop_after_steps=14)
    cfg = tiny_cfg(tmp_path / "ffcv", "train.ckpt_every=8", f"data.beton={path}", "data.workers=1")
    with pytest.raises(Crash):
        Trainer(cfg).fit(stop_after_steps=14, on_step=crash_at(10))
    Trainer(cfg).fit(stop_after_steps=14)
    assert "(FFCV)" in capsys.readouterr().out
    assert losses(tmp_path / "ffcv") == pytest.approx(losses(tmp_path / "tv"), rel=1e-6, abs=1e-6)


@pytest.mark.integration
def test_finetuning_and_evaluation_from_betons_match_the_torchvision_run(tmp_path):
    """finetune.beton / eval.beton: the same batches and views as the torchvision datasets, hence the same
    classifier (AFF: the encoder trains too) and the same per-image results."""
    from advcl_dist.engine import Trainer
    from advcl_dist.finetune import finetune
    from tests.test_engine import tiny_cfg

    betons = {split: write_beton(get_dataset("digits", split), tmp_path / f"{split}.beton", workers=2,
                                 info={"dataset": "digits", "split": split}) for split in ("train", "test")}
    Trainer(tiny_cfg(tmp_path / "pre")).fit(stop_after_steps=2)
    common = [f"finetune.checkpoint={tmp_path / 'pre' / 'checkpoint.pt'}", "finetune.mode=aff", "finetune.epochs=1",
              "finetune.batch_size=256", "attack.supervised_steps=1", "attack.eval_steps=1",
              "eval.autoattack=false", "eval.batch_size=120", "data.workers=1"]
    finetune(tiny_cfg(tmp_path / "tv", *common))
    finetune(tiny_cfg(tmp_path / "ffcv", *common, f"finetune.beton={betons['train']}",
                      f"eval.beton={betons['test']}"))
    weights = [torch.load(tmp_path / run / "classifier.pt", weights_only=False)["model"] for run in ("tv", "ffcv")]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-5, atol=1e-6, msg=key)
    flags = [np.load(tmp_path / run / "flags.npz") for run in ("tv", "ffcv")]
    assert all(np.array_equal(flags[0][k], flags[1][k]) for k in ("clean", "robust"))
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("tv", "ffcv")]
    assert results[0]["SA"] == results[1]["SA"] and results[0]["n_test"] == results[1]["n_test"] == 360
    # the AutoAttack sample reads a beton's labels from its header: the same images as from the torchvision set
    from advcl_dist.aa_subset import source_labels
    from advcl_dist.data.source import finetune_data, image_source

    beton_images = image_source(finetune_data(tiny_cfg(tmp_path / "x"), "test", str(betons["test"])))
    np.testing.assert_array_equal(source_labels(beton_images), get_dataset("digits", "test").labels.numpy())
