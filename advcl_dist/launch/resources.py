"""What a job asks the cluster for, and the submitit executor that asks for it.

The executors are chosen by name (`--cluster slurm|local|debug`), never by submitit's
auto-detection: on a machine without SLURM, `slurm` fails with a message instead of quietly
running the job on the login node.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

CLUSTER_KINDS = ("slurm", "local", "debug")
SIGNAL_DELAY_S = 120  # SIGUSR2 this long before the time limit: time to finish a step and write the checkpoint


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 10
    mem_gb: float | None = None  # per node; None: the partition's default
    timeout_min: int = 24 * 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    comment: str | None = None
    max_requeue: int = 20  # requeues after a time limit; preemptions do not count

    @property
    def tasks_per_node(self) -> int:
        """One task per GPU; one per node on CPU-only nodes."""
        return max(self.gpus_per_node, 1)

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        gpus = f"{self.gpus_per_node} GPU{'s' if self.gpus_per_node != 1 else ''}/node" if self.gpus_per_node \
            else "no GPU"
        mem = f", {self.mem_gb:g} GB/node" if self.mem_gb else ""
        return (f"{self.nodes} node{'s' if self.nodes > 1 else ''} × {self.tasks_per_node} task"
                f"{'s' if self.tasks_per_node > 1 else ''} ({gpus}, {self.cpus_per_task} CPUs/task{mem}), "
                f"time limit {self.timeout_min} min, up to {self.max_requeue} requeues")


def add_resource_arguments(parser: argparse.ArgumentParser) -> None:
    d = Resources()
    g = parser.add_argument_group("cluster resources")
    g.add_argument("--cluster", choices=CLUSTER_KINDS, default="slurm",
                   help="slurm: sbatch through submitit (default); local: subprocesses on this machine, "
                        "waiting for each; debug: in this process")
    g.add_argument("--nodes", type=int, default=d.nodes, help="nodes of the multi-rank stages (default %(default)s)")
    g.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node,
                   help="one task per GPU; 0: CPU nodes, one task per node (default %(default)s)")
    g.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task, help="default %(default)s")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node (default: the partition's)")
    g.add_argument("--timeout", type=int, default=d.timeout_min, metavar="MIN",
                   help="time limit of every job in minutes; a job at its limit checkpoints, is requeued "
                        "and resumes (default %(default)s)")
    for name in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        g.add_argument(f"--{name}", default=None, help=f"sbatch --{name}")
    g.add_argument("--max-requeue", type=int, default=d.max_requeue,
                   help="requeues after a time limit before giving up; preemptions do not count (default %(default)s)")


def resources_from_args(args: argparse.Namespace) -> Resources:
    for key in ("nodes", "cpus_per_task", "timeout"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1")
    if args.gpus_per_node < 0 or args.max_requeue < 0:
        raise ConfigError("--gpus-per-node and --max-requeue must be >= 0")
    if args.mem_gb is not None and args.mem_gb <= 0:
        raise ConfigError("--mem-gb must be > 0")
    return Resources(args.nodes, args.gpus_per_node, args.cpus_per_task, args.mem_gb, args.timeout, args.partition,
                     args.account, args.qos, args.constraint, args.exclude, args.comment, args.max_requeue)


def slurm_parameters(r: Resources, job_name: str, dependency: str | None = None) -> dict:
    """submitit's SlurmExecutor parameters (its names for sbatch options)."""
    params = {"job_name": job_name, "nodes": r.nodes, "ntasks_per_node": r.tasks_per_node,
              "cpus_per_task": r.cpus_per_task, "time": r.timeout_min, "signal_delay_s": SIGNAL_DELAY_S,
              # --requeue: clusters where JobRequeue=0 would otherwise refuse `scontrol requeue`
              "additional_parameters": {"requeue": True}}
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.mem_gb:
        params["mem"] = f"{max(1, round(r.mem_gb * 1024))}MB"
    for key in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        if getattr(r, key) is not None:
            params[key] = getattr(r, key)
    if dependency:
        params["dependency"] = dependency
    return params


def require_sbatch() -> None:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ConfigError("--cluster slurm needs SLURM's sbatch and srun on PATH, and this machine has none; "
                          "submit from a login node of the cluster, or run here with --cluster local "
                          "(subprocesses) or --cluster debug (this process)")


def make_executor(cluster: str, folder: Path, r: Resources, job_name: str, dependency: str | None = None):
    """A submitit executor writing its scripts, pickles and logs under `folder`."""
    import submitit

    if cluster == "slurm":
        require_sbatch()
        executor = submitit.SlurmExecutor(folder, max_num_timeout=r.max_requeue)
        executor.update_parameters(**slurm_parameters(r, job_name, dependency))
    elif cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=r.max_requeue)
        # One machine: the tasks of every node run here (2 nodes × 1 task → 2 local tasks).
        executor.update_parameters(tasks_per_node=r.tasks, gpus_per_node=r.gpus_per_node * r.nodes,
                                   timeout_min=r.timeout_min, signal_delay_s=SIGNAL_DELAY_S)
    elif cluster == "debug":
        if r.tasks > 1:
            raise ConfigError(f"--cluster debug runs one process, but this job has {r.tasks} tasks; "
                              "use --nodes 1 --gpus-per-node 0 or 1, or --cluster local")
        executor = submitit.DebugExecutor(folder)
    else:
        raise ConfigError(f"--cluster {cluster!r} is not one of {list(CLUSTER_KINDS)}")
    return executor


def sbatch_script(folder: Path, r: Resources, job_name: str, dependency: str | None = None,
                  array: int | None = None) -> str:
    """The sbatch file submitit would write for this job (for --dry-run; needs no SLURM)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the function SlurmExecutor writes its files with

    params = slurm_parameters(r, job_name, dependency)
    if array is not None and array > 1:
        params["map_count"] = array
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **params)
