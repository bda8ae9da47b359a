#!/usr/bin/env python
"""Write a dataset to an FFCV .beton once; training then reads it with data.beton=FILE:
python tools/write_ffcv.py --dataset cifar10 --split train --root data --out data/cifar10-train.beton
python tools/write_ffcv.py --dataset imagefolder --split train --root /shared/imagenet \\
    --out /shared/imagenet-train.beton --max-resolution 512 --jpeg-quality 90
Sample i of the file is image i of the dataset (the index pseudo-labels use). 32x32 and 96x96 sets are
stored raw (bit-exact); ImageFolder trees as JPEG with the longer side capped (default 512).
An existing --out is replaced only with --overwrite; a failed or interrupted write leaves no file behind."""
import argparse
import sys

from advcl_dist.data import DATASETS, DatasetNotFoundError
from advcl_dist.data.ffcv_support import FFCVNotInstalledError
from advcl_dist.data.ffcv_writer import WRITE_MODES, BetonPathError, BetonWriteError, write_dataset


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--split", required=True, help="train or test (stl10 also: unlabeled, train+unlabeled)")
    p.add_argument("--out", required=True, help="the .beton to write (a .json beside it records what it holds)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--root", default=None, help="folder holding the dataset (data.root); not needed for digits")
    p.add_argument("--download", action="store_true", help="download CIFAR / STL-10 into --root first")
    p.add_argument("--write-mode", choices=WRITE_MODES, default=None,
                   help="raw pixels, jpg, proportion (a random share as JPEG) or smart; "
                        "default: raw for digits/cifar/stl10, jpg for imagefolder")
    p.add_argument("--max-resolution", type=int, default=None,
                   help="shrink the longer side to this first (default: 512 for imagefolder, none otherwise)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-probability", type=float, default=0.5, help="share stored as JPEG (proportion)")
    p.add_argument("--workers", type=int, default=-1, help="writer processes (-1: all cores)")
    p.add_argument("--chunk-size", type=int, default=100, help="samples per work item of a writer process")
    return p


def fail(message: str) -> None:
    """One line on stderr and exit status 2, like the stage CLIs."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    a = parser().parse_args()
    try:
        write_dataset(a.dataset, a.split, a.out, root=a.root, download=a.download, write_mode=a.write_mode,
                      max_resolution=a.max_resolution, jpeg_quality=a.jpeg_quality,
                      compress_probability=a.compress_probability, workers=a.workers, chunk_size=a.chunk_size,
                      overwrite=a.overwrite)
    except DatasetNotFoundError as err:
        fail(f"{err} (data.root and data.download are --root and --download here)")
    except (BetonPathError, FFCVNotInstalledError, BetonWriteError, ValueError) as err:
        fail(str(err))
    except KeyboardInterrupt:
        print(f"write_ffcv: interrupted; {a.out} was not written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
