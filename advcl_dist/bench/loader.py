"""`tools/bench.py loader`: images/s of the FFCV path against the torchvision DataLoader path.

"The whole path" is what a training step waits for before its model forward: decoding, collation, the
transfer to the device and the AdvCL views made there (x, t1, t2 and x_h, with the functions AdvCL's
training_step calls). Both formats use the same workers (DataLoader processes or FFCV threads) on the
same cores, and read the same synthetic images: smooth multi-scale colour noise (a roughly 1/f spectrum,
like photographs), not white noise, which would make JPEGs unrealistically large and slow to decode.
Up to 96 px the torchvision path reads in-memory arrays (as for CIFAR and STL-10) and the .beton stores
raw pixels; above, it decodes an ImageFolder of JPEGs and the .beton stores JPEGs, both at quality 90.
"""
from __future__ import annotations

import json
import math
import os
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ViewsConfig
from ..data.augment import crop_flip_view
from ..data.datasets import ImageFolderDataset, TensorImageDataset
from ..data.loader import build_loader
from ..distributed import pick_device
from ..methods.advcl import AdvCLSettings
from ..methods.simclr import simclr_views
from ..rng import StepRandom
from ..views import high_frequency

FORMATS = ("torchvision", "ffcv")
IN_MEMORY_MAX_SIZE = 96  # CIFAR-10/100 (32 px) and STL-10 (96 px) are read from memory
CLASSES = 10


def synthetic_images(n: int, size: int, seed: int, chunk: int = 256):
    """`n` uint8 [3, size, size] images (in chunks) and labels i % 10: octaves of bicubic colour noise
    whose amplitude falls with frequency, plus mild pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    for lo in range(0, n, chunk):
        b = min(chunk, n - lo)
        x = torch.zeros(b, 3, size, size)
        k = 2
        while k <= size:
            grid = torch.rand(b, 3, k, k, generator=generator) - 0.5
            x += F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False) * (2 / k) ** 0.6
            k *= 2
        x = x * 204 + 128 + 4 * torch.randn(b, 3, size, size, generator=generator)
        yield x.round().clamp(0, 255).to(torch.uint8), torch.arange(lo, lo + b) % CLASSES


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def torchvision_data(n: int, size: int, seed: int, root: Path) -> tuple[torch.utils.data.Dataset, dict]:
    """The dataset the torchvision path reads, written once: .npy arrays up to 96 px, else JPEG files."""
    in_memory = size <= IN_MEMORY_MAX_SIZE
    path = root / ("images.npy" if in_memory else "folder")
    write_seconds = None
    if not path.exists():
        start = time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / (path.name + ".partial")
        if in_memory:
            labels = np.arange(n) % CLASSES
            np.save(root / "labels.npy", labels)
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
            for i, (images, _) in enumerate(synthetic_images(n, size, seed)):
                out[i * 256: i * 256 + len(images)] = images.numpy()
            out.flush()
            del out
        else:
            from PIL import Image

            for c in range(CLASSES):
                (tmp / "train" / str(c)).mkdir(parents=True, exist_ok=True)
            i = 0
            for images, labels in synthetic_images(n, size, seed):
                for image, label in zip(images, labels.tolist()):
                    Image.fromarray(image.permute(1, 2, 0).numpy()).save(
                        tmp / "train" / str(label) / f"{i:07d}.jpg", quality=90)
                    i += 1
        os.replace(tmp, path)
        write_seconds = time.perf_counter() - start
    if in_memory:
        dataset = TensorImageDataset(torch.from_numpy(np.load(path)), torch.from_numpy(np.load(root / "labels.npy")))
        data_bytes = _disk_bytes(path) + _disk_bytes(root / "labels.npy")
    else:
        dataset = ImageFolderDataset(path / "train")  # what get_dataset("imagefolder", "train", path) returns
        data_bytes = _disk_bytes(path)
    return dataset, {"data": str(path), "bytes": data_bytes, "write_seconds": write_seconds}


def ffcv_data(dataset, size: int, root: Path, workers: int) -> dict:
    """The .beton of the same dataset, written once: raw pixels up to 96 px, else JPEG at quality 90."""
    from ..data.ffcv_writer import write_beton

    path = root / "data.beton"
    write_seconds = None
    if not path.exists():
        start = time.perf_counter()
        write_beton(dataset, path, write_mode="raw" if size <= IN_MEMORY_MAX_SIZE else "jpg", jpeg_quality=90,
                    max_resolution=None, workers=workers)
        write_seconds = time.perf_counter() - start
    return {"data": str(path), "bytes": _disk_bytes(path), "write_seconds": write_seconds}


def make_loader(fmt: str, dataset, data: dict, args, device: torch.device):
    common = dict(shuffle=True, drop_last=True, workers=args.workers, seed=0, image_size=args.size)
    if fmt == "torchvision":
        return build_loader(dataset, args.batch_size, **common)
    from ..data.ffcv_loader import build_ffcv_loader

    return build_ffcv_loader(data["data"], args.batch_size, **common, rank=0, world_size=1, device=device,
                             os_cache=True)


def measure(loader, device: torch.device, size: int, warmup: int, batches: int, views: bool = True) -> dict:
    """Seconds for `batches` batches through decode, transfer and views, after `warmup` untimed batches
    (DataLoader workers start and FFCV compiles its pipeline on the first ones); epochs cycle as needed.
    Without `views`, decode and transfer only: what the CPU does when a GPU makes the views."""
    config = ViewsConfig(size=size)
    random = StepRandom(device, seed=0)
    end = warmup + batches
    step = images = epoch = 0
    while step < end:
        loader.set_epoch(epoch)
        epoch += 1
        for batch, labels, indices in loader:
            if step == end:  # leaving mid-epoch stops the loader (FFCV's decode thread too)
                break
            batch = batch.to(device, non_blocking=True)
            labels, indices = labels.to(device, non_blocking=True), indices.to(device, non_blocking=True)
            if views:
                generator = random.reseed(step)
                x = crop_flip_view(batch, generator, size=config.size, padding=config.padding)
                simclr_views(batch, generator, config)  # t1, t2
                high_frequency(x, AdvCLSettings().hf_radius)  # x_h
            step += 1
            images += len(batch) if step > warmup else 0
            if step in (warmup, end):
                _sync(device)
                if step == warmup:
                    start = time.perf_counter()
                else:
                    seconds = time.perf_counter() - start
    return {"images": images, "batches": batches, "seconds": seconds, "images_per_s": images / seconds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(fmt: str, dataset, data: dict, args, device: torch.device) -> dict:
    loader = make_loader(fmt, dataset, data, args, device)
    batches = math.ceil(args.images * args.epochs / args.batch_size)
    result = measure(loader, device, args.size, args.warmup, batches, args.views)
    del loader  # its worker processes or threads exit before the next format runs
    report = {"bench": "loader", "format": fmt, "size": args.size, "dataset_images": args.images, **result,
              "views": args.views, "batch_size": args.batch_size, "warmup_batches": args.warmup,
              "workers": args.workers, "torch_threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0)),
              "device": str(device), **data, "torch": torch.__version__, "ffcv": _version("ffcv")}
    print(f"{fmt}: {result['images']} images of {args.size} px in {result['seconds']:.2f} s = "
          f"{result['images_per_s']:.0f} images/s ({args.workers} workers, batch {args.batch_size}, {device}"
          f"{'' if args.views else ', no views'})", flush=True)
    return report


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(args) -> dict:
    device = pick_device(args.device)
    if args.batch_size is None:
        args.batch_size = 512 if args.size <= IN_MEMORY_MAX_SIZE else 64
    if args.images < args.batch_size:
        raise SystemExit(f"--images ({args.images}) must be at least --batch-size ({args.batch_size})")
    if args.epochs <= 0 or args.warmup < 1:
        raise SystemExit(f"need --epochs > 0 and --warmup >= 1, got {args.epochs} and {args.warmup}")
    root = Path(args.cache) / f"loader-{args.images}-{args.size}-{args.seed}"
    dataset, tv = torchvision_data(args.images, args.size, args.seed, root)
    data = {"torchvision": tv, "ffcv": ffcv_data(dataset, args.size, root, args.workers)}
    print(f"data: {root} ({args.images} images of {args.size} px; torchvision {tv['bytes'] / 2**20:.1f} MiB, "
          f"ffcv {data['ffcv']['bytes'] / 2**20:.1f} MiB), {len(os.sched_getaffinity(0))} cores", flush=True)
    formats = [args.format] if args.format else list(FORMATS)
    runs = [run(fmt, dataset, data[fmt], args, device) for fmt in formats]
    if len(runs) == 1:
        report = runs[0]
    else:
        ratio = runs[1]["images_per_s"] / runs[0]["images_per_s"]
        print(f"ffcv / torchvision: {ratio:.2f}×")
        report = {"bench": "loader", "format": "both", "size": args.size, "runs": runs, "ffcv_over_torchvision": ratio}
    print(json.dumps(report))
    return report
