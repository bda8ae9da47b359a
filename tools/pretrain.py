#!/usr/bin/env python
"""Pretrain an encoder (any registered method: advcl, simclr, acl, dynacl, ...; docs/methods.md) on one
process or on every rank of a launch:
python tools/pretrain.py --config configs/demo.yaml [key=value ...]
torchrun --nproc_per_node 8 tools/pretrain.py --config configs/cifar10_advcl.yaml [key=value ...]"""
import sys

from advcl_dist.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("advcl_dist.engine:pretrain", __doc__))
