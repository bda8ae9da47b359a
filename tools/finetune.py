#!/usr/bin/env python
"""Finetune a pretrained encoder (SLF / ALF / AFF), then evaluate it (SA, RA, AA) into results.json, on one
process or on every rank of torchrun / srun (the global finetune.batch_size split over the ranks):
python tools/finetune.py --config configs/demo.yaml finetune.checkpoint=runs/demo/advcl/checkpoint.pt \\
    finetune.mode=slf out_dir=runs/demo/my-slf [key=value ...]"""
import sys

from advcl_dist.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("advcl_dist.finetune:finetune", __doc__))
