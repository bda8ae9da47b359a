"""Shared set-up of the suite.

Under pytest-xdist (`make test` runs one worker per core, a file per worker at a time) every worker, and
every process a test starts, computes on one thread: the tests' tensors are tiny, and two workers × two
threads on two cores would only wait on each other. Alone (`pytest tests/test_x.py`), torch keeps its default.

Files are handed out slowest tier first (SLURM jobs, then multi-process runs, then whole tools; the Makefile's
--no-loadscope-reorder keeps xdist from re-sorting them by test count), so that the two SLURM files, which
partly wait on jobs, start together and overlap the rest instead of running alone at the end.
"""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the processes tests start
    torch.set_num_threads(1)

TIERS = ("slurm", "distributed", "integration")  # slowest first; unmarked files last


def pytest_collection_modifyitems(items):
    tier = {}
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        rank = next((i for i, name in enumerate(TIERS) if name in marks), len(TIERS))
        tier[item.path] = min(tier.get(item.path, rank), rank)
    position = {item: i for i, item in enumerate(items)}
    items.sort(key=lambda item: (tier[item.path], position[item]))  # a file's tests stay together, in order


@pytest.fixture(scope="session")
def slurm():
    """The local SLURM cluster of tests/slurm_jobs.py, up (started once if needed)."""
    from slurm_jobs import ensure_cluster

    ensure_cluster()
