"""FFCV loading: every image decoded once on CPU by FFCV's compiled pipeline, uint8 batches to the device.

The order is the torchvision path's (`ShardedSampler`): a (seed + epoch) permutation split rank::world.
That is exactly FFCV's RANDOM order with distributed=True (torch's DistributedSampler), but it is also
defined for one process, so 1 and N ranks see the same global batches, and it can start an epoch
mid-way, so a resumed run replays the same shuffles without decoding the batches it already trained on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import torch

from .ffcv_support import FIELDS, keep_torch_threads, require_ffcv

require_ffcv()  # a clear error when FFCV is missing; and the first import of FFCV keeps torch's threads

from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader as _Loader  # noqa: E402
from ffcv.loader import OrderOption  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

from ..config_schema import UserError  # noqa: E402
from .datasets import DatasetNotFoundError  # noqa: E402
from .ffcv_writer import info_path  # noqa: E402
from .loader import Loader, ShardedSampler  # noqa: E402


class BetonError(UserError, ValueError):
    """A .beton that this trainer cannot use (not FFCV, other fields, other data)."""


@dataclass
class BetonInfo:
    """What a .beton holds, read from its header and metadata without decoding an image."""

    path: Path
    num_samples: int
    labels: np.ndarray  # int64 [N]; -1 = unlabelled
    heights: np.ndarray
    widths: np.ndarray
    written: dict = field(default_factory=dict)  # X.beton.json of tools/write_ffcv.py ({} when absent)

    @property
    def num_classes(self) -> int:
        classes = self.written.get("classes")
        if classes:
            return len(classes)
        return int(self.labels.max()) + 1 if self.num_samples else 0

    @property
    def fixed_size(self) -> int | None:
        """The side of every image when all are the same square, else None."""
        if self.num_samples and (self.heights == self.heights[0]).all() and (self.widths == self.heights[0]).all():
            return int(self.heights[0])
        return None


def read_beton(path: str | Path, option: str = "data.beton") -> BetonInfo:
    """Header, labels and image sizes of ``path``; clear errors naming ``option`` for a missing or foreign file."""
    path = Path(path).expanduser()
    fix = (f"Write it with `python tools/write_ffcv.py --dataset NAME --split SPLIT --out {path}`, or set "
           f"{option} to an existing file.")
    if not path.is_file():
        raise DatasetNotFoundError(f"{option}: {path} does not exist. {fix}")
    try:
        reader = Reader(str(path))
    except Exception as err:  # FFCV asserts on a wrong header and numpy fails on a short file
        raise BetonError(f"{option}: {path} is not a readable FFCV 1.0 .beton ({type(err).__name__}: {err}). "
                         f"{fix}") from err
    if tuple(reader.field_names) != FIELDS:
        raise BetonError(f"{option}: {path} has fields {reader.field_names}, but this trainer reads "
                         f"{list(FIELDS)} (the index field maps each sample to its dataset index). {fix}")
    column = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}
    if not np.array_equal(column["index"], np.arange(reader.num_samples)):
        raise BetonError(f"{option}: sample i of {path} is not dataset index i. {fix}")
    written = info_path(path)
    return BetonInfo(path=path, num_samples=int(reader.num_samples), labels=column["label"].astype(np.int64),
                     heights=column["image"]["height"].astype(np.int64),
                     widths=column["image"]["width"].astype(np.int64),
                     written=json.loads(written.read_text()) if written.is_file() else {})


class _RankOrder(TraversalOrder):
    """This rank's share of the epoch, from ``start`` on, cut to whole batches when ``drop_last``."""

    def __init__(self, loader: _Loader, sampler: ShardedSampler, batch_size: int, drop_last: bool):
        super().__init__(loader)
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last

    def sample_order(self, epoch: int) -> Sequence[int]:
        # Epoch and skip are the sampler's, set by `Loader.set_epoch`; FFCV's own epoch counter is not used.
        positions = self.sampler.rank_indices()
        end = len(positions) // self.batch_size * self.batch_size if self.drop_last else len(positions)
        return self.indices[np.asarray(positions[self.sampler.start:end], dtype=np.int64)]


class FFCVLoader(Loader):
    """A `Loader` (same epochs, skips and batches) that reads a .beton with FFCV; batches are on the device."""

    def __init__(self, batch_size: int, sampler: ShardedSampler, loader: _Loader):
        super().__init__(None, batch_size, sampler, loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        with keep_torch_threads():
            batches = iter(self._dataloader)
        finished = False
        try:
            for images, labels, indices in batches:
                # NCHW like the torchvision path (the trainer's channels_last lives in the weights); also a
                # copy, so the batch outlives FFCV's reuse of its buffers.
                yield images.contiguous(), labels.view(-1), indices.view(-1)
            finished = True
        finally:
            if not finished:
                # Left mid-epoch (a step limit, an exception): FFCV's decode thread would go on, holding its
                # buffers, and can abort the interpreter at exit. Stop it, wait for it, then free the buffers.
                batches.terminate_event.set()
                batches.join()
                batches.close()

    def __len__(self) -> int:
        left = len(self.sampler)
        return left // self.batch_size if self.drop_last else math.ceil(left / self.batch_size)


def image_decoder(info: BetonInfo, image_size: int | None, option: str = "data.image_size"):
    """Decode to the fixed-size base image the device makes every view from.

    Square images of the requested side are copied as stored (bit-exact for raw files). Otherwise the
    central square (the shorter side) is resized to ``image_size``, as `resize_center_crop` does.
    """
    side = info.fixed_size
    if image_size is None or image_size == side:
        if side is None:
            raise BetonError(f"{info.path} holds images of different sizes; set {option} to the side of the "
                             f"square base image to decode them to (e.g. {option}=256)")
        return SimpleRGBImageDecoder()
    return CenterCropRGBImageDecoder((image_size, image_size), ratio=1.0)


def build_ffcv_loader(
    path: str | Path,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    workers: int = -1,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    image_size: int | None = None,
    device: torch.device | str = "cpu",
    os_cache: bool = True,
    indices: Sequence[int] | None = None,
    info: BetonInfo | None = None,
) -> FFCVLoader:
    """Per-rank FFCV loader of ``(images uint8 [B,3,S,S], labels int64 [B], indices int64 [B])`` on ``device``.

    ``workers`` is FFCV's decode threads (-1: all cores; at most the threads numba was started with);
    ``os_cache`` lets the page cache hold the file for all ranks of a node (False: each process caches
    what it reads, for files larger than memory); ``indices`` restricts the loader to those samples
    (e.g. one rank's block for feature extraction).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # numba refuses more threads than it started with (the cores, unless NUMBA_NUM_THREADS says otherwise).
    available = numba.config.NUMBA_NUM_THREADS
    workers = available if workers < 1 else min(workers, available)
    info = info or read_beton(path)
    device = torch.device(device)
    # On CPU the batch is already where it is used; on GPU FFCV copies it from pinned memory on its own stream.
    to_device = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    pipelines = {
        # ToTorchImage after ToDevice: a zero-copy NHWC→NCHW view of the device batch (its contiguous form
        # would be written to a host buffer); `FFCVLoader` makes it contiguous NCHW where it is used.
        "image": [image_decoder(info, image_size), ToTensor(), *to_device, ToTorchImage(channels_last=True)],
        "label": [IntDecoder(), ToTensor(), *to_device],
        "index": [IntDecoder(), ToTensor(), *to_device],
    }
    chosen = np.arange(info.num_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    sampler = ShardedSampler(len(chosen), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                             drop_last=drop_last)
    with keep_torch_threads():
        loader = _Loader(str(info.path), batch_size=batch_size, num_workers=workers, os_cache=os_cache,
                         order=OrderOption.SEQUENTIAL, seed=seed, indices=chosen, pipelines=pipelines,
                         drop_last=drop_last)
    # FFCV 1.0.2 cannot take a custom order class in its constructor (it calls an instance), so it is set here.
    loader.traversal_order = _RankOrder(loader, sampler, batch_size, drop_last)
    return FFCVLoader(batch_size, sampler, loader)


class BetonImages:
    """A .beton as an ordered image collection (feature extraction): ``len``, ``subset`` and
    ``ordered_batches`` like a Dataset read through `loader.ordered_batches`, but decoded by FFCV."""

    def __init__(self, info: BetonInfo, *, workers: int = -1, os_cache: bool = True,
                 indices: Sequence[int] | None = None):
        self.info = info
        self.workers = workers
        self.os_cache = os_cache
        self.indices = np.arange(info.num_samples) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        """The labels of `indices`, from the header (no image decoded)."""
        return self.info.labels[self.indices]

    def subset(self, indices: Sequence[int]) -> BetonImages:
        return BetonImages(self.info, workers=self.workers, os_cache=self.os_cache,
                           indices=self.indices[np.asarray(indices, dtype=np.int64)])

    def ordered_batches(self, batch_size: int, image_size: int | None, device: torch.device | str):
        """Float [0, 1] images and labels on ``device``, in the order of ``indices``."""
        from .augment import to_float

        loader = build_ffcv_loader(self.info.path, batch_size, shuffle=False, drop_last=False, workers=self.workers,
                                   image_size=image_size, device=device, os_cache=self.os_cache,
                                   indices=self.indices, info=self.info)
        loader.set_epoch(0)
        for images, labels, _ in loader:
            yield to_float(images), labels
