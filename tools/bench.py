#!/usr/bin/env python
"""Benchmarks; each prints a table and one JSON line last.

  kmeans   ensemble k-means (the clustering stage) on 1 and N processes vs scikit-learn:
           python tools/bench.py kmeans --rows 1000000 --dim 128 --procs 1 2
  loader   images/s through decode + transfer + the AdvCL views on the device, FFCV vs torchvision,
           on synthetic images generated once (in both formats) under --cache:
           python tools/bench.py loader --format ffcv --images 20000 --size 32
           (no --format: both, then their ratio; the JSON line is then one object with both runs)
"""
import argparse
import sys

from advcl_dist.bench import kmeans, loader


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    km = sub.add_parser("kmeans", help="distributed ensemble k-means vs scikit-learn KMeans")
    km.add_argument("--rows", type=int, default=1_000_000)
    km.add_argument("--dim", type=int, default=128)
    km.add_argument("--centres", type=int, default=1000, help="Gaussian blobs the synthetic features come from")
    km.add_argument("--ks", type=int, nargs="+", default=[2, 10, 50, 100, 500])
    km.add_argument("--iters", type=int, default=20)
    km.add_argument("--seed", type=int, default=0)
    km.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to time ours with")
    km.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    km.add_argument("--no-sklearn", dest="sklearn", action="store_false", help="skip the scikit-learn run")
    km.add_argument("--cache", default=".cache/bench", help="where the generated data are kept")
    ld = sub.add_parser("loader", help="FFCV vs torchvision DataLoader images/s, views on the device included")
    ld.add_argument("--format", choices=loader.FORMATS, help="the path to time (default: both, and their ratio)")
    ld.add_argument("--images", type=int, default=20_000, help="images generated (and timed, once per epoch)")
    ld.add_argument("--epochs", type=float, default=1, help="timed passes over the images (rounded up to a batch)")
    ld.add_argument("--size", type=int, default=32, help="image side in pixels (<= 96: in memory / raw, "
                    "else JPEG files / JPEG .beton)")
    ld.add_argument("--batch-size", type=int, help="default 512 up to 96 px, else 64")
    ld.add_argument("--workers", type=int, default=2, help="DataLoader processes / FFCV threads")
    ld.add_argument("--warmup", type=int, default=8, help="batches run before the clock starts")
    ld.add_argument("--no-views", dest="views", action="store_false",
                    help="time decode and transfer only (what the CPU does when a GPU makes the views)")
    ld.add_argument("--seed", type=int, default=0)
    ld.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ld.add_argument("--cache", default=".cache/bench", help="where the generated data are kept")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    sys.exit({"kmeans": kmeans.main, "loader": loader.main}[args.bench](args) and 0)
