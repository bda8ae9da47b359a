#!/usr/bin/env python
"""Figures of a finished run, written into its folder:
  tsne RUN_DIR     t-SNE of the test-set features, one panel per pretrained encoder (tsne.png)
  curves RUN_DIR   RA vs ε and vs PGD steps of every evaluation run with eval.curves=true (curves.png)
  summary RUN_DIR  all of them and the SA / RA / AA bars (summary.png), as the pipeline writes them
RUN_DIR: a pipeline folder (e.g. runs/demo); for tsne also a pretraining run folder (its checkpoint.pt).
python tools/plot.py tsne runs/demo"""
import argparse
import sys

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=["tsne", "curves", "summary"])
    parser.add_argument("folder", metavar="RUN_DIR")
    parser.add_argument("--n", type=int, default=2000, help="t-SNE of the first N test images (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="t-SNE seed (default 0)")
    parser.add_argument("--device", default="cpu", help="where the encoders run (default cpu)")
    args = parser.parse_args()
    if args.n < 5:
        parser.error("--n must be >= 5")
    from advcl_dist.config import ConfigError  # torch: after parsing, so --help is instant
    from advcl_dist.summary_figures import plot_folder

    try:
        written = plot_folder(args.figure, args.folder, args.n, args.seed, args.device)
    except (FileNotFoundError, ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(path)
