#!/usr/bin/env python
"""Submit AdvCL to SLURM with submitit. With no arguments, `python tools/submit.py --nodes 4` runs the
paper's CIFAR-10 pipeline (configs/cifar10_advcl.yaml) on 4 nodes of 8 GPUs: SimCLR f_pre → pseudo-labels
→ AdvCL → SLF + evaluation, each stage its own job chained with afterok; it prints the job ids and the
folders to watch. One stage: --stage pretrain|cluster|finetune|evaluate. A grid of overrides as job
arrays: --sweep configs/sweeps/X.yaml. See the plan first: --dry-run. Jobs at their time limit (or
preempted) checkpoint, are requeued and resume.

  python tools/submit.py --nodes 4 --partition gpu --output /shared/runs/c10
  python tools/submit.py --stage pretrain --config configs/demo.yaml --nodes 2 --gpus-per-node 0 train.epochs=2
  python tools/submit.py --sweep configs/sweeps/cifar10_k_ablation.yaml --nodes 2 && python tools/report.py DIR"""
import sys

from advcl_dist.launch import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
