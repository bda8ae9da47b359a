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
import os
import signal
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist


class StopRequest:
    """A flag set by a signal handler; `agreed()` says, identically on every rank, when to stop.

    Ctrl-C (SIGINT) is a stop request too: the first one stops at the next step boundary (evaluation: after
    its block) with the checkpoint written; a second one quits at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None  # the signal that asked
        self._group = None
        self._pending = None  # (work, tensor) posted at the previous boundary

    def set(self, signum: int | None = None, _frame=None) -> None:
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            if os.environ.get("RANK", "0") == "0":
                print("\nCtrl-C: stopping at the next step boundary with a checkpoint (Ctrl-C again to quit at "
                      "once)", file=sys.stderr, flush=True)
        self.requested = True
        self.signal = signum

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


def signal_name(signum: int | None) -> str:
    """"SIGINT (Ctrl-C)", "SIGUSR2 (the launcher's time-limit warning)", or "request" when set directly."""
    if signum is None:
        return "request"
    name = signal.Signals(signum).name
    return {"SIGINT": "SIGINT (Ctrl-C)", "SIGUSR2": "SIGUSR2 (the launcher's time-limit warning)"}.get(name, name)


@contextlib.contextmanager
def stop_on_signal(*signums: int) -> Iterator[StopRequest]:
    """Route `signums` (default SIGUSR2) to a StopRequest for the duration (pass it to the stage); the previous
    handlers come back afterwards."""
    request = StopRequest()
    previous = {s: signal.signal(s, request.set) for s in signums or (signal.SIGUSR2,)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
