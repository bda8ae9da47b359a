"""Named crash points for the kill-anywhere tests: `ADVCL_FAULT=<point>[:<file>][@<n>]` SIGKILLs the process.

Each place where a crash matters calls `fault_point(name)` (or `fault_point(name, file_name)` inside the
atomic writer). Unset — every run outside the tests — it costs one environment lookup. Set, the process
kills itself with SIGKILL (no handler, no `finally`, no flush: what a node failure or the OOM killer does)
the n-th time (default 1st) execution reaches the point; `:<file>` restricts a writer point to one file
name, `ADVCL_FAULT_RANK=r` to one rank of a launch (default: every rank). The variables are read when a
stage starts (`check_environment`) and at each point, never at import: a process forked from one that
imported this module (tests/warm_tools.py) follows its own environment. tests/test_kill_matrix.py kills a stage
at each point, reruns the same command and compares the result with an uninterrupted run's.
"""
from __future__ import annotations

import functools
import os
import signal

from .config_schema import ConfigError

ENV, RANK_ENV = "ADVCL_FAULT", "ADVCL_FAULT_RANK"

# Every point the code reaches, and where it is.
POINTS = {
    "train.mid_step": "a training step's loss is computed, the weights not yet updated",
    "train.before_checkpoint": "a step is done, its checkpoint not yet written",
    "write.before_rename": "a file's temporary copy is written and synced, not yet renamed over it",
    "stage.before_finished": "a stage's outputs are written, run.json not yet marked finished",
    "cluster.after_features": "every rank's features are cached, k-means not started",
    "cluster.between_k": "the k-means of one K is done, the next K not started",
    "evaluate.between_blocks": "an evaluation block is cached, the next not started",
    "evaluate.before_results": "every block is done, results.json not yet written",
    "pipeline.between_stages": "a pipeline stage is finished, pipeline.json not yet updated",
    "launch.requeue": "a SLURM job stopped at its time limit, before it requeues itself",
}


@functools.lru_cache(maxsize=4)
def _parse(spec: str) -> tuple[str, str | None, int]:
    point, _, count = spec.partition("@")
    point, _, file_name = point.partition(":")
    if point not in POINTS or not (count or "1").isdigit() or int(count or 1) < 1:
        raise ConfigError(f"{ENV}={spec!r} is not <point>[:<file>][@<n ≥ 1>] with a known point; unset it, or "
                          f"use one of: {', '.join(POINTS)}")
    return point, file_name or None, int(count or 1)


_hits = 0


def _this_rank() -> bool:
    wanted = os.environ.get(RANK_ENV)
    if wanted is None:
        return True
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == wanted


def fault_point(name: str, file_name: str | None = None) -> None:
    """SIGKILL this process here if `ADVCL_FAULT` names this point (and file) and its count is reached."""
    global _hits
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, only_file, count = _parse(spec)
    if name != point or (only_file is not None and file_name != only_file) or not _this_rank():
        return
    _hits += 1
    if _hits == count:
        os.kill(os.getpid(), signal.SIGKILL)


def check_environment() -> None:
    """Refuse an unknown point before the stage does any work (a one-line ConfigError)."""
    spec = os.environ.get(ENV)
    if spec:
        _parse(spec)
