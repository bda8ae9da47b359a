#!/usr/bin/env python
"""Pseudo-labels from f_pre features (ensemble k-means) into <out_dir>/pseudo_labels.npy:
python tools/cluster.py --config configs/demo.yaml pseudo.fpre=runs/demo/simclr/checkpoint.pt \\
    out_dir=runs/demo/cluster
Runs on one process or on every rank of torchrun / srun (each rank embeds its share of the images)."""
import sys

from advcl_dist.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("advcl_dist.cluster:cluster", __doc__))
