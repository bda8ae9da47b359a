"""Running a function on several gloo ranks, each a fresh process set up the way torchrun sets one up."""
from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from advcl_dist.distributed import free_port


def _entry(rank, world, port, fn, args, results):
    # One thread per rank: two ranks on two cores must not fight over OpenMP threads.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    results[rank] = fn(*args)


def run_ranks(world: int, fn, *args) -> list:
    """`fn(*args)` on `world` processes (RANK, WORLD_SIZE, ... in their environment); their return values."""
    results = mp.Manager().dict()
    mp.spawn(_entry, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
    return [results[r] for r in range(world)]
