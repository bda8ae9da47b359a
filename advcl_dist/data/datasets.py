"""Datasets of ``(uint8 [3,H,W] image, int label)`` in a fixed order, so that an index names one image.

Augmentation is not done here: it runs later, batched on the device. torchvision is imported only for
the datasets read through it (CIFAR, STL-10, ImageFolder): importing it costs ~2 s (it pulls in
torch._dynamo), paid by every process of every launch otherwise.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset

from ..config_schema import ConfigError

DATASETS = ("digits", "cifar10", "cifar100", "stl10", "imagefolder")

SPLITS = {
    "digits": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
    "imagefolder": ("train", "test"),
}

DIGITS_TEST_SIZE = 360
DIGITS_SIZE = 32

# Formats torchvision.io.decode_image reads; anything else goes through PIL.
_NATIVE_DECODE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")


class DatasetNotFoundError(FileNotFoundError):
    """Data missing on disk; raised by get_dataset so that a bad path fails before training starts."""


class UnreadableImageError(ConfigError):
    """An image file that does not decode. The decoders' own errors name no file, which at ImageNet size
    leaves the user no way to find it."""

    path: str | None = None
    reason: str | None = None


def decode_reason(err: BaseException) -> str:
    """``Type: message`` of a decode error, without the C++ source location torchvision puts first."""
    message = re.sub(r"^(\S+, )?\S+\.(cpp|cc|h):\d+, ", "", str(err).strip())
    return f"{type(err).__name__}: {message}"


def unreadable_image(path: str, err: BaseException) -> UnreadableImageError:
    """The error for an image that failed to decode: the file, the reason, and how to find all such files."""
    reason = decode_reason(err)
    error = UnreadableImageError(f"cannot read image {path} ({reason}); replace or remove it. data.scan=true "
                                 "checks every image before training starts and lists all bad files.")
    error.path, error.reason = path, reason
    return error


def sample_path(dataset, index: int) -> str | None:
    """The file of sample ``index`` of an ImageFolder, or of a Subset of one (None for in-memory datasets)."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None)
    return samples[index][0] if samples is not None else None


class TensorImageDataset(Dataset):
    """In-memory images ``[N,3,H,W]`` uint8 with int64 labels (``-1`` = unlabeled)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A contiguous copy: callers may modify it, and the STL-10 storage is a strided view.
        image = self.images[index].clone(memory_format=torch.contiguous_format)
        return image, int(self.labels[index])


def read_rgb(path: str) -> torch.Tensor:
    """Decode an image file to uint8 ``[3,H,W]`` RGB (grey and alpha are converted); a file that does not
    decode raises `UnreadableImageError` naming it."""
    try:
        return _decode_rgb(path)
    except Exception as err:
        raise unreadable_image(path, err) from err


def _decode_rgb(path: str) -> torch.Tensor:
    if path.lower().endswith(_NATIVE_DECODE_SUFFIXES):
        from torchvision.io import ImageReadMode, decode_image

        return decode_image(path, mode=ImageReadMode.RGB)
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _without_md5(files: list[list[str]]) -> list[list[str | None]]:
    return [[name, None] for name, _ in files]


@functools.cache
def _torchvision_classes() -> dict[str, type]:
    """torchvision's dataset classes and ours built on them, on first use.

    torchvision checks md5 on every read; the STL-10 reader only checks that the files exist (md5=None), so
    that md5 is verified once, at download time, by the original class. CIFAR is not read through
    torchvision at all (its files are pickles, see cifar.py); only its file lists are used."""
    from torchvision.datasets import CIFAR10, CIFAR100, STL10, ImageFolder

    class ImageFolderDataset(ImageFolder):
        """ImageFolder that yields uint8 RGB tensors at native size."""

        def __init__(self, root: str | Path):
            super().__init__(str(root), loader=read_rgb)

    stl10_reader = type("_STL10Reader", (STL10,), {"train_list": _without_md5(STL10.train_list),
                                                  "test_list": _without_md5(STL10.test_list)})
    return {"CIFAR10": CIFAR10, "CIFAR100": CIFAR100, "STL10": STL10, "ImageFolderDataset": ImageFolderDataset,
            "STL10Reader": stl10_reader}


def __getattr__(name: str):
    if name == "ImageFolderDataset":  # torchvision's ImageFolder yielding uint8 RGB tensors, built on first use
        return _torchvision_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_dataset(name: str, split: str, root: str | Path | None = None, download: bool = False) -> Dataset:
    """Return the ``(image, label)`` dataset ``name``/``split``; missing data raises DatasetNotFoundError."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if split not in SPLITS[name]:
        valid = ", ".join(SPLITS[name])
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; valid splits: {valid}")
    if name == "digits":
        return _digits(split)
    if name in ("cifar10", "cifar100"):
        original = _torchvision_classes()["CIFAR10" if name == "cifar10" else "CIFAR100"]
        from .cifar import read_cifar  # its own module: the pickle-safe reader of CIFAR's files

        return read_cifar(original, f"CIFAR-{name[5:]}", split, root, download)
    if name == "stl10":
        return _stl10(split, root, download)
    return _imagefolder(split, root)


def num_classes(dataset: Dataset) -> int:
    """Number of classes of a `get_dataset` result (0 for unlabelled data)."""
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = torch.as_tensor(getattr(dataset, "targets", []))
    return int(labels.max()) + 1 if len(labels) else 0


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits: images [N, 8, 8] (float, 0-16) and labels [N], as `load_digits` gives them.

    Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`: 64 pixels and the label
    per row) without importing scikit-learn, which would add ~1.7 s to every process's start-up; through
    `load_digits` if that file is not where it used to be."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


@functools.lru_cache(maxsize=1)
def _digits_all() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """All 1797 digits as uint8 [N,3,32,32], their labels, and the fixed split permutation."""
    pixels, target = digits_pixels()
    small = torch.from_numpy(pixels).to(torch.float32).unsqueeze(1) * (255.0 / 16.0)
    big = F.interpolate(small, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(target).to(torch.int64)
    perm = np.random.default_rng(0).permutation(len(images))
    return images, labels, perm


def _digits(split: str) -> TensorImageDataset:
    images, labels, perm = _digits_all()
    chosen = perm[-DIGITS_TEST_SIZE:] if split == "test" else perm[:-DIGITS_TEST_SIZE]
    chosen = torch.from_numpy(chosen)
    return TensorImageDataset(images[chosen], labels[chosen], classes=[str(d) for d in range(10)])


def _require_root(title: str, root: str | Path | None, folder: str) -> Path:
    if root is None:
        raise DatasetNotFoundError(
            f"{title} needs a data root, but none was given. Set data.root to the folder that "
            f"contains {folder}."
        )
    return Path(root).expanduser()


def _require_files(title: str, folder: Path, files: list[str], fix: str) -> None:
    """Fail now, naming the first missing path, rather than deep inside torchvision or at the first item."""
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{title} not found: {folder} does not exist. {fix}")
    for name in files:
        path = folder / name
        if not path.is_file():
            raise DatasetNotFoundError(f"{title} incomplete: {path} does not exist. {fix}")


def _download_fix(folder: str) -> str:
    return (
        f"Set data.root to the folder that contains {folder}, or set data.download=true to download it there."
    )


def _stl10(split: str, root, download: bool) -> TensorImageDataset:
    title = "STL-10"
    tv = _torchvision_classes()
    reader = tv["STL10Reader"]
    root = _require_root(title, root, reader.base_folder)
    if download:
        # The split read here only verifies the download; "test" is the smallest one that checks all files.
        tv["STL10"](str(root), split="test", download=True)
    files = [name for name, _ in reader.train_list + reader.test_list]
    _require_files(title, root / reader.base_folder, files, _download_fix(reader.base_folder))
    data = reader(str(root), split=split)
    # data.data is already [N,3,96,96] (a transposed view); it stays a view to avoid copying 2.7 GB.
    images = torch.from_numpy(data.data)
    labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
    return TensorImageDataset(images, labels, classes=getattr(data, "classes", None))


def _imagefolder(split: str, root) -> Dataset:
    title = "ImageFolder"
    root = _require_root(title, root, "train/ and test/ (one subfolder per class in each)")
    folder = root / split
    fix = f"Set data.root to the folder that contains {split}/, laid out as {split}/<class>/<image files>."
    _require_files(title, folder, [], fix)
    try:
        return _torchvision_classes()["ImageFolderDataset"](folder)
    except FileNotFoundError as err:  # no class folders, or no images in them
        raise DatasetNotFoundError(f"{title} has no images under {folder}: {err} {fix}") from err
