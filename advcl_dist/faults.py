"""Named crash points for the kill-anywhere tests: `ADVCL_FAULT=<point>[:<file>][@<n>]` SIGKILLs the process.

Each place where a crash matters calls `fault_point(name)` (or `fault_point(name, file_name)` inside the
atomic writer). Unset — every run outside the tests — it costs one dict lookup. Set, the process kills
itself with SIGKILL (no handler, no `finally`, no flush: what a node failure or the OOM killer does) the
n-th time (default 1st) execution reaches the point; `:<file>` restricts a writer point to one file name,
`ADVCL_FAULT_RANK=r` to one rank of a launch (default: every rank). tests/test_kill_matrix.py kills a stage
at each point, reruns the same command and compares the result with an uninterrupted run's.
"""
from __future__ import annotations

import os
import signal

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


def _parse(spec: str | None) -> tuple[str, str | None, int] | None:
    if not spec:
        return None
    point, _, count = spec.partition("@")
    point, _, file_name = point.partition(":")
    if point not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown point {point!r}; points: {', '.join(POINTS)}")
    return point, file_name or None, int(count or 1)


_SPEC = _parse(os.environ.get(ENV))
_hits = 0


def _this_rank() -> bool:
    wanted = os.environ.get(RANK_ENV)
    if wanted is None:
        return True
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == wanted


def fault_point(name: str, file_name: str | None = None) -> None:
    """SIGKILL this process here if `ADVCL_FAULT` names this point (and file) and its count is reached."""
    global _hits
    if _SPEC is None:
        return
    point, only_file, count = _SPEC
    if name != point or (only_file is not None and file_name != only_file) or not _this_rank():
        return
    _hits += 1
    if _hits == count:
        os.kill(os.getpid(), signal.SIGKILL)
