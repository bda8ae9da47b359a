"""Write a `get_dataset` dataset to an FFCV .beton once, so that training decodes it without Python per image.

Sample i of the file is dataset index i (its `index` field says so), the index that pseudo-labels use.
Next to `X.beton` goes `X.beton.json`: which dataset and split it holds, so that a loader can refuse a
file of other data before pseudo-labels are looked up by the wrong index.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .ffcv_support import FIELDS, require_ffcv

WRITE_MODES = ("raw", "jpg", "proportion", "smart")


class BetonWriteError(RuntimeError):
    """A sample could not be read or encoded; names the sample and leaves no .beton behind."""


class BetonPathError(ValueError):
    """The output path cannot take the .beton (a folder, an existing file, no write access); raised before
    anything is read or written."""


def check_out(path: str | Path, overwrite: bool) -> Path:
    """The absolute output path, refused now rather than after the whole dataset has been encoded."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise BetonPathError(f"--out {path} is a folder; give the path of the .beton file to write in it, "
                             f"e.g. --out {path / 'train.beton'}")
    if path.exists() and not overwrite:
        raise BetonPathError(f"--out {path} exists; pass --overwrite to replace it, or choose another path")
    _check_writable_folder(path.parent)
    return path


def _check_writable_folder(folder: Path) -> None:
    """The folder (or, if it is still to be made, its nearest existing ancestor) takes a new file."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BetonPathError(f"cannot write into {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):  # a real write: also catches read-only mounts and ACLs
            pass
    except OSError as err:
        raise BetonPathError(f"cannot write into {folder}: {err.strerror or err}") from err


class _Samples:
    """`(HWC uint8 image, label, index)` for FFCV's writer; a failure is reported to the parent first."""

    def __init__(self, dataset: Dataset, error_file: Path):
        self.dataset = dataset
        self.error_file = error_file
        self.files = getattr(dataset, "samples", None)  # ImageFolder: (path, class) per index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, label = self.dataset[index]
            return np.ascontiguousarray(image.permute(1, 2, 0).numpy()), int(label), int(index)
        except Exception as err:
            where = f"sample {index}" + (f" ({self.files[index][0]})" if self.files else "")
            self.error_file.write_text(f"{where}: {type(err).__name__}: {err}")
            raise


def _write(writer, samples: _Samples, chunk_size: int) -> None:
    os.setpgrp()  # its own process group, so that the parent can stop FFCV's workers with it
    writer.from_indexed_dataset(samples, chunksize=chunk_size)


def write_beton(
    dataset: Dataset,
    path: str | Path,
    *,
    write_mode: str = "raw",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    workers: int = -1,
    chunk_size: int = 100,
    info: dict | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``dataset`` to ``path`` (atomically) and ``path``.json with ``info``; returns the path.
    An existing ``path`` is replaced only with ``overwrite``; a failed or interrupted write leaves no file.

    ``raw`` keeps pixels bit-exact (32×32 and 96×96 sets); ``jpg``, ``proportion`` (a random
    ``compress_probability`` share as JPEG) and ``smart`` trade pixels for size on ImageNet-size trees,
    after shrinking the longer side to ``max_resolution``.
    """
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from ..run_folder import write_json

    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 1:
        raise ValueError(f"max_resolution must be >= 1, got {max_resolution}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty; there is nothing to write")
    path = check_out(path, overwrite)
    made = _make_folders(path.parent)
    partial = path.with_name(path.name + ".partial")
    error_file = path.with_name(path.name + ".error")
    image = RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                          compress_probability=compress_probability)
    fields = dict(zip(FIELDS, (image, IntField(), IntField())))
    start = time.time()
    try:
        for stale in (partial, error_file):
            stale.unlink(missing_ok=True)
        writer = DatasetWriter(str(partial), fields, num_workers=workers)
        _write_file(writer, _Samples(dataset, error_file), partial, path, chunk_size)
    except BaseException:  # a failed or interrupted (Ctrl-C) write leaves nothing behind
        partial.unlink(missing_ok=True)
        error_file.unlink(missing_ok=True)
        for folder in reversed(made):
            _remove_if_empty(folder)
        raise
    record = {**(info or {}), "num_samples": len(dataset), "fields": list(FIELDS), "write_mode": write_mode,
              "max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
              "compress_probability": compress_probability, "bytes": path.stat().st_size,
              "seconds": round(time.time() - start, 2)}
    write_json(record, info_path(path))
    return path


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; the ones made, outermost first (removed again on failure)."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty: something else was put there meanwhile
        pass


def _write_file(writer, samples: _Samples, partial: Path, path: Path, chunk_size: int) -> None:
    """Let ``writer`` fill ``partial`` in a child process, then move it to ``path``.

    FFCV's progress loop waits for every sample: a worker that dies on a bad image would leave it
    spinning forever. So the write runs in a child process, stopped as soon as a sample reports an error
    (or the parent is interrupted)."""
    child = mp.get_context("fork").Process(target=_write, args=(writer, samples, chunk_size))
    child.start()
    try:
        while child.is_alive() and not samples.error_file.exists():
            child.join(0.2)
    finally:
        if child.is_alive():
            os.killpg(child.pid, signal.SIGKILL)
            child.join()
    if samples.error_file.exists():
        raise BetonWriteError(f"could not write {path}: {samples.error_file.read_text()}")
    if child.exitcode != 0:
        raise BetonWriteError(f"could not write {path}: FFCV's writer exited with code {child.exitcode}")
    os.replace(partial, path)


def info_path(path: str | Path) -> Path:
    """``X.beton.json``: what the file holds."""
    path = Path(path)
    return path.with_name(path.name + ".json")


FIXED_SIZE_SETS = ("digits", "cifar10", "cifar100", "stl10")  # small images of one size: raw pixels
IMAGEFOLDER_MAX_RESOLUTION = 512  # longer side kept for ImageNet-size trees: room for 224-256 px base images


def write_dataset(name: str, split: str, out: str | Path, *, root: str | None = None, download: bool = False,
                  write_mode: str | None = None, max_resolution: int | None = None, jpeg_quality: int = 90,
                  compress_probability: float = 0.5, workers: int = -1, chunk_size: int = 100,
                  overwrite: bool = False) -> Path:
    """`tools/write_ffcv.py`: ``get_dataset(name, split, root)`` to ``out``, with defaults per kind of data.
    ``out`` is checked first, so that a bad path fails before the dataset is read."""
    from .datasets import get_dataset

    check_out(out, overwrite)
    dataset = get_dataset(name, split, root, download)
    if write_mode is None:
        write_mode = "raw" if name in FIXED_SIZE_SETS else "jpg"
    if max_resolution is None and name not in FIXED_SIZE_SETS:
        max_resolution = IMAGEFOLDER_MAX_RESOLUTION
    classes = getattr(dataset, "classes", None)
    info = {"dataset": name, "split": split, "root": None if root is None else str(Path(root).absolute()),
            "classes": list(classes) if classes else None}
    print(f"[write_ffcv] {name}/{split}: {len(dataset)} images → {out} ({write_mode}"
          + (f", longer side <= {max_resolution}" if max_resolution else "")
          + (f", JPEG quality {jpeg_quality}" if write_mode != "raw" else "") + ")", flush=True)
    path = write_beton(dataset, out, write_mode=write_mode, max_resolution=max_resolution,
                       jpeg_quality=jpeg_quality, compress_probability=compress_probability, workers=workers,
                       chunk_size=chunk_size, info=info, overwrite=overwrite)
    print(f"[write_ffcv] wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) and {info_path(path).name}",
          flush=True)
    return path
