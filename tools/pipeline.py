#!/usr/bin/env python
"""Run the whole pipeline — SimCLR f_pre → pseudo-labels → AdvCL → finetune + evaluate, and the baselines —
skipping stages that already finished: python tools/pipeline.py --config configs/demo.yaml [key=value ...]"""
import sys

from advcl_dist.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("advcl_dist.pipeline:run_pipeline", __doc__))
