"""Pick the data path of a stage: FFCV where a .beton is given, torchvision datasets otherwise.

Both yield the same `(images uint8, labels, indices)` batches in the same order, so the rest of the
trainer does not know which one it reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import Config, ConfigError, DataConfig
from .datasets import get_dataset, num_classes
from .ffcv_support import require_ffcv
from .loader import Loader, build_loader


def data_format(data: DataConfig) -> str:
    """``ffcv`` or ``torchvision``: data.format, or (when null) ffcv exactly when data.beton is set."""
    if data.format is not None:
        return data.format
    return "ffcv" if data.beton else "torchvision"


@dataclass
class TrainingData:
    loader: Loader
    num_samples: int
    num_classes: int
    description: str  # for the run's header line


def beton_info(data: DataConfig):
    """The checked `BetonInfo` of data.beton: FFCV importable, the file readable and of data.name/data.split."""
    require_ffcv()
    from .ffcv_loader import read_beton

    info = read_beton(data.beton)
    for key, option, want in (("dataset", "data.name", data.name), ("split", "data.split", data.split)):
        have = info.written.get(key)
        if have is not None and have != want:
            raise ConfigError(f"data.beton {info.path} holds {key} {have!r}, but {option} is {want!r}; "
                              "pseudo-labels and results would refer to other images. Point data.beton at "
                              f"the file of {data.name}/{data.split}, or set {option}={have}.")
    return info


def _ffcv_threads(data: DataConfig) -> int:
    """FFCV decode threads: data.workers, where 0 (no DataLoader workers) means FFCV's -1, every core."""
    return data.workers or -1


def training_data(data: DataConfig, batch_size: int, *, seed: int, rank: int, world_size: int,
                  device: torch.device, shuffle: bool = True, drop_last: bool = True,
                  select=None) -> TrainingData:
    """This rank's loader of data.name/data.split, from data.beton with FFCV or from `get_dataset`.

    `select(num_samples)` may restrict it to some dataset indices (None: all); num_samples stays the
    dataset's size, and batches report dataset indices. With data.scan an ImageFolder is decoded once first,
    so that a bad image stops the run here, named, rather than mid-epoch."""
    if data_format(data) == "ffcv":
        from .ffcv_loader import build_ffcv_loader

        info = beton_info(data)
        indices = select(info.num_samples) if select else None
        loader = build_ffcv_loader(info.path, batch_size, shuffle=shuffle, drop_last=drop_last,
                                   workers=_ffcv_threads(data), seed=seed, rank=rank, world_size=world_size,
                                   image_size=data.image_size, device=device, os_cache=data.os_cache, info=info,
                                   indices=indices)
        return TrainingData(loader, info.num_samples, info.num_classes, f"{info.path} (FFCV)")
    dataset = get_dataset(data.name, data.split, data.root, data.download)
    indices = select(len(dataset)) if select else None
    if data.scan and data.name == "imagefolder":
        from .scan import scan_images

        scan_images(dataset, workers=data.workers, image_size=data.image_size, indices=indices, rank=rank,
                    world_size=world_size)
    loader = build_loader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, workers=data.workers,
                          seed=seed, rank=rank, world_size=world_size, image_size=data.image_size,
                          indices=indices)
    return TrainingData(loader, len(dataset), num_classes(dataset), "torchvision")


def image_source(data: DataConfig):
    """data.name/data.split in dataset-index order for `ordered_batches` (feature extraction): the .beton
    (decoded by FFCV) where the FFCV path is chosen, else the `get_dataset` dataset."""
    if data_format(data) == "ffcv":
        from .ffcv_loader import BetonImages

        return BetonImages(beton_info(data), workers=_ffcv_threads(data), os_cache=data.os_cache)
    return get_dataset(data.name, data.split, data.root, data.download)


def finetune_data(cfg: Config, split: str = "train", beton: str | None = None) -> DataConfig:
    """The finetuning set's `split` (`finetune.dataset`/`root`, or the pretraining data's): read from `beton`
    with FFCV when given, else torchvision; base images resized to `views.size` (transfer, e.g. STL-10 → 32)."""
    name = cfg.finetune.dataset or cfg.data.name
    root = cfg.finetune.root if cfg.finetune.root is not None else cfg.data.root
    return dataclasses.replace(cfg.data, name=name, split=split, root=root, beton=beton,
                               format="ffcv" if beton else "torchvision", image_size=cfg.views.size)
