#!/usr/bin/env python
"""Pretrain an encoder (advcl, simclr, supervised_at):
python tools/pretrain.py --config configs/demo.yaml [key=value ...]"""
import sys

from advcl_dist.cli import run_stage
from advcl_dist.engine import pretrain

if __name__ == "__main__":
    sys.exit(run_stage(pretrain, __doc__))
