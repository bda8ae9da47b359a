"""Stop at a step boundary when SLURM warns of the time limit or of preemption.

SLURM sends SIGUSR2 (`--signal=USR2@90`, or `scancel --signal=USR2`) to every task some time before
it kills the job. Rather than losing the steps since the last periodic checkpoint, the trainer
stops at the next step boundary, writes its checkpoint and returns; the launcher then requeues
the job (advcl_dist.launch.job). Ranks can receive the signal during different steps, so they
agree on where to stop: each boundary posts this rank's flag in an asynchronous all-reduce on a
CPU (gloo) group and reads the previous boundary's result, which has long arrived by then, so
no rank ever waits on it and the GPU stream is never synchronised.
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import torch
import torch.distributed as dist


class StopRequest:
    """A flag set by a signal handler; `agreed()` says, identically on every rank, when to stop."""

    def __init__(self) -> None:
        self.requested = False
        self._group = None
        self._pending = None  # (work, tensor) posted at the previous boundary

    def set(self, *_) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Call at every step boundary on every rank; True on all ranks at the same boundary."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        if self._group is None:
            # gloo so the flag stays on the host even when the training group is NCCL
            self._group = dist.new_group(backend="gloo")
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return stop

    def close(self) -> None:
        """Finish the collective still in flight (every rank posted it), then drop the group."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


@contextlib.contextmanager
def stop_on_signal(signum: int = signal.SIGUSR2) -> Iterator[StopRequest]:
    """Route `signum` to a StopRequest for the duration (pass it to the stage); the previous handler comes
    back afterwards."""
    request = StopRequest()
    previous = signal.signal(signum, request.set)
    try:
        yield request
    finally:
        signal.signal(signum, previous)
