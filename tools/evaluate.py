#!/usr/bin/env python
"""Evaluate a finetuned classifier (SA, RA = PGD-20, AA = AutoAttack) into <out_dir>/results.json, on one
process or on every rank of torchrun / srun (the test set sharded in fixed blocks, cached for restarts):
python tools/evaluate.py --config configs/demo.yaml eval.checkpoint=runs/demo/advcl-slf/classifier.pt \\
    out_dir=runs/demo/advcl-slf-eval [eval.aa_n=1000 ...]"""
import sys

from advcl_dist.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("advcl_dist.evaluate:evaluate", __doc__))
