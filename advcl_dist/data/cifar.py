"""CIFAR-10 / CIFAR-100 from their official python files, which are pickles: read by `safe_pickle`, never by
`pickle.load` (torchvision's), so a crafted file in data.root cannot run code."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config_schema import ConfigError
from . import safe_pickle
from .datasets import TensorImageDataset, _download_fix, _require_files, _require_root


def read_cifar(original, title: str, split: str, root, download: bool) -> TensorImageDataset:
    root = _require_root(title, root, original.base_folder)
    if download:
        _download(original, root)
    files = [name for name, _ in original.train_list + original.test_list] + [original.meta["filename"]]
    folder = root / original.base_folder
    _require_files(title, folder, files, _download_fix(original.base_folder))
    batches = original.train_list if split == "train" else original.test_list
    images, labels = _read_batches([folder / name for name, _ in batches])
    classes = safe_pickle.load(folder / original.meta["filename"])[original.meta["key"]]
    return TensorImageDataset(torch.from_numpy(images), torch.as_tensor(labels, dtype=torch.int64),
                              classes=list(classes))


def _read_batches(paths: list[Path]) -> tuple[np.ndarray, list[int]]:
    """Images uint8 [N,3,32,32] and labels of CIFAR batch files, unpickled by `safe_pickle`: a plain
    `pickle.load` (torchvision's) runs whatever code a crafted file in data.root carries."""
    images, labels = [], []
    for path in paths:
        entry = safe_pickle.load(path)
        try:
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in entry["labels" if "labels" in entry else "fine_labels"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path} is not a CIFAR batch file ({type(err).__name__}: {err}); delete it and "
                              "set data.download=true to fetch the official files.") from err
    return np.ascontiguousarray(np.concatenate(images)), labels


def _download(original, root: Path) -> None:
    """Fetch the archive unless every file is there with its md5, as torchvision's `download()` does, but
    without its constructor, which would unpickle the files with `pickle.load`."""
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    folder = root / original.base_folder
    files = original.train_list + original.test_list + [[original.meta["filename"], original.meta["md5"]]]
    if all(check_integrity(str(folder / name), md5) for name, md5 in files):
        return
    download_and_extract_archive(original.url, str(root), filename=original.filename, md5=original.tgz_md5)
