"""Process groups from torchrun, SLURM or a single process, and the collectives that need autograd.

Launchers, in order of precedence:
- torchrun (also `srun torchrun`): RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
- SLURM tasks (`srun`, submitit): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the master is the first
  host of the job's node list and the port is derived from the job id, so every task agrees without
  talking (MASTER_ADDR / MASTER_PORT, when set, win);
- otherwise one process, no process group.
NCCL on GPUs (one device per local rank), gloo on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config_schema import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str = "single"  # single | torchrun | slurm | external (a group made by the caller)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    init_method: str
    launcher: str


def launch_env() -> LaunchEnv | None:
    """Where this process sits in a multi-process launch, read from the environment; None when alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env://",
                         "torchrun")
    # SLURM_STEP_ID marks an `srun` step: a plain `python` in an sbatch script or salloc shell is one process
    # even when the allocation has several tasks, and must not wait for peers that will never come.
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID")):
        # submitit's SLURM environment parses the compressed node list (node[3-4],gpu07 → node3, ...).
        from submitit.slurm.slurm import SlurmJobEnvironment

        slurm = SlurmJobEnvironment()
        addr = env.get("MASTER_ADDR", slurm.hostnames[0])
        port = int(env.get("MASTER_PORT", slurm_port(slurm.job_id)))
        return LaunchEnv(slurm.global_rank, slurm.num_tasks, slurm.local_rank, f"tcp://{addr}:{port}", "slurm")
    return None


def slurm_port(job_id: str) -> int:
    """A port in [20000, 60000) every task of the job computes alike; jobs sharing a node rarely collide."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"  # array jobs: 123_4
    return 20000 + int(digits) % 40000


def free_port() -> int:
    """A TCP port nobody listens on now (for single-node launches made by the tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_rank_entry(rank, world, port, threads, fn, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    results[rank] = fn(*args)


def run_local_ranks(world: int, fn, *args, threads: int = 1) -> list:
    """`fn(*args)` on `world` fresh processes of this machine, each set up the way torchrun sets one up
    (RANK, WORLD_SIZE, ... and `threads` OpenMP threads, so ranks sharing cores do not fight over them);
    their return values in rank order. For tests and benchmarks."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_local_rank_entry, args=(world, free_port(), threads, fn, args, results), nprocs=world, join=True)
    return [results[r] for r in range(world)]


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """`cuda:<local rank>` (or the only visible GPU, when the launcher gives each task one) or the CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        count = torch.cuda.device_count()
        if count > 1 and local_rank >= count:
            raise ConfigError(f"local rank {local_rank} has no GPU: only {count} are visible on this node; "
                               "start one process per GPU (torchrun --nproc_per_node / --gpus-per-node)")
        return torch.device("cuda", local_rank if count > 1 else 0)
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_minutes: float = 30) -> DistInfo:
    """Join the caller's process group, or create one from the launcher's environment, or run alone."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, pick_device(device, local), "external")
    env = launch_env()
    if env is None or env.world_size == 1:
        return DistInfo(0, 1, 0, pick_device(device))
    dev = pick_device(device, env.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=env.init_method,
                            rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(env.rank, env.world_size, env.local_rank, dev, env.launcher)


class RankLostError(RuntimeError):
    """Another rank of the launch died (or its node did): this one stops too, naming it."""


# What gloo / the store say when a peer's sockets close; NCCL reports a dead peer as a watchdog timeout.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout")
ROLL_CALL_S = 10.0


def _peer_gone(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _PEER_GONE)


def lost_ranks(timeout_s: float = ROLL_CALL_S) -> list[int]:
    """The ranks that do not answer a roll call on the launch's key-value store within `timeout_s`.

    After a collective fails because a peer's connection closed, gloo cannot say which rank is gone; every
    survivor reaches this point within moments, writes its name to the store and waits for the others'.
    The store lives in rank 0's process (or torchrun's agent): if it is unreachable, rank 0 is the lost one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"advcl/roll_call/{rank}", "here")
        deadline = time.monotonic() + timeout_s
        while True:
            here = {r for r in range(world) if store.check([f"advcl/roll_call/{r}"])}
            if len(here) == world or time.monotonic() > deadline:
                return sorted(set(range(world)) - here)
            time.sleep(0.2)
    except (RuntimeError, dist.DistError):
        return [0]


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistInfo]:
    """`init_distributed` for the duration of a stage; a group created here is destroyed on exit.

    A rank that dies mid-stage breaks the others' next collective: they stop with `RankLostError` naming it
    (after a roll call of at most ROLL_CALL_S), instead of a socket error or waiting forever."""
    created = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    except Exception as e:
        if info.world_size > 1 and _peer_gone(e):
            lost = [r for r in lost_ranks() if r != info.rank]
            who = f"rank {', '.join(map(str, lost))}" if lost else "another rank"
            raise RankLostError(f"[rank {info.rank}] {who} of {info.world_size} stopped responding (its process or "
                                "node died: see its log); this rank stops too. Run the same command again to resume "
                                "from the last checkpoint") from None
        raise
    finally:
        if created and dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):  # a group with a dead peer may fail to tear down
                dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def node_names() -> list[str]:
    """Node names of all ranks, in rank order (one entry per rank): SLURM's name for the node when there is one."""
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if world_size() == 1:
        return [name]
    names: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(names, name)
    return names


def gather_shards(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows concatenated in rank order (shards may differ in length), and the row counts.

    No autograd. Rows are padded to the longest shard because all_gather needs equal shapes.
    """
    if world_size() == 1:
        return x, [x.shape[0]]
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]), counts


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order; the backward hands each rank the summed gradient of its rows.

    Written here because torch.distributed.nn's autograd all_gather is deprecated. The backward is a
    reduce-scatter: each rank receives only its own rows' sums, half an all-reduce's bytes on NCCL's ring
    (gloo runs it as an all-reduce underneath); docs/scaling.md: the gathers, not the gradients, dominate
    communication at large global batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        own = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        dist.reduce_scatter_single(own, grad)
        return own


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (every rank passes the same number; autograd flows back to the owner) and this
    rank's row offset. Gradients are summed over ranks: each rank's loss counts, as in sum-of-losses."""
    if world_size() == 1:
        return x, 0
    return _GatherRows.apply(x), dist.get_rank() * x.shape[0]
