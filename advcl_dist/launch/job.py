"""The callable every submitted job runs: one stage, on every task of the job, safe to requeue.

A time limit or a preemption (SIGUSR2 from SLURM) ends in a requeue: pretraining and finetuning first
stop at the next step boundary and write their checkpoint, evaluation after its current block (all
passed the stop request, engine/preemption.py); the clustering stage is requeued at once.
`checkpoint()` hands submitit the same job, which resumes from the stage's fixed checkpoint
(`checkpoint.pt`, `classifier.pt`, the evaluation's block cache, the clustering's feature cache).
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

import torch

from ..config import Config
from ..distributed import slurm_port
from ..engine.preemption import stop_on_signal
from ..faults import fault_point
from ..pipeline import Stage


def task_threads(cpus_per_task: int, cluster: str, num_tasks: int) -> int:
    """--cpus-per-task, capped at the CPUs this task may run on: SLURM's CPU binding, or this machine's cores
    shared by a local launch's tasks. More OpenMP threads than cores preempt each other: under `--cluster debug`
    on 2 cores the demo's SimCLR stage ran at 9 images/s with the default 10 threads, at 540-580 with 2."""
    usable = len(os.sched_getaffinity(0))
    if cluster in ("local", "debug"):
        usable //= max(1, num_tasks)
    return max(1, min(cpus_per_task, usable))


@dataclass
class StageJob:
    stage: Stage
    cpus_per_task: int

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        self._set_up_process(env)
        cfg: Config = self.stage.cfg  # derived on the node: it checks files that earlier jobs wrote
        if not self.stage.graceful:
            return self.stage.run(cfg)  # submitit's own handler requeues at once on SIGUSR2
        # The stage stops gracefully; submitit's handler (requeue, or give up after too many time limits)
        # runs once the checkpoint is written. _usr_sig is the signal submitit asked SLURM for.
        usr_sig = env._usr_sig()
        submitit_handler = signal.getsignal(usr_sig)
        with stop_on_signal(usr_sig) as stop:
            result = self.stage.run(cfg, stop=stop)
        if stop.requested and not self.stage.is_done() and callable(submitit_handler):
            fault_point("launch.requeue")
            submitit_handler(usr_sig, None)  # task 0 requeues the job and exits; the others return
        return result

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on SIGUSR2: requeue the same job, which resumes from the stage's checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _set_up_process(self, env) -> None:
        threads = task_threads(self.cpus_per_task, env.cluster, env.num_tasks)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        if env.cluster == "local" and env.num_tasks > 1:
            # submitit's local tasks know their rank but nothing else: set them up as torchrun would.
            os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                              LOCAL_RANK=str(env.local_rank), MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(slurm_port(env.job_id)))
        # SLURM tasks need nothing: distributed.launch_env reads SLURM_PROCID / SLURM_NTASKS / the node list.
        print(f"[launch] {self.stage.name}: {env} → {self.stage.folder}", file=sys.stderr, flush=True)
