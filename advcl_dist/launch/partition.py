"""Does a job fit its SLURM partition? Checked before any sbatch, because SLURM queues a job that asks
more than the partition's nodes have (CPUs, GPUs, memory) and leaves it PENDING (PartitionConfig) forever
without a word.

The partition (`--partition`, else the cluster's default) is read with one `sinfo -N` call, a line per
node. Partitions may mix node kinds: each per-node request is bounded by the largest node of the partition
(the most CPUs, GPUs, memory any node has), and then `--nodes` by how many nodes hold the whole per-node
request at once. Accounts, QOS, constraints and reservations are left to SLURM.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass

from ..config import ConfigError
from .resources import Resources

# partition (no '*') | partition ('*' = default) | avail | time limit | job size in nodes | CPUs | MB | gres | node
SINFO_FORMAT = "%R|%P|%a|%l|%s|%c|%m|%G|%N"
SINFO_TIMEOUT_S = 30  # sinfo retries a missing slurm.conf for a minute
UNLIMITED = ("infinite", "unlimited")


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    avail: str  # up, down, drain, inact
    time_limit_s: int | None  # None: no limit
    min_nodes: int
    max_nodes: int | None  # per job; None: no limit
    nodes: tuple[Node, ...]

    def largest(self, field: str) -> int:
        return max(getattr(n, field) for n in self.nodes)


def parse_time_limit(text: str) -> int | None:
    """SLURM's time formats (sinfo %l, scontrol MaxTime) in seconds; None for no limit.
    `days-hh[:mm[:ss]]`, `hh:mm:ss`, `mm:ss`, `mm`."""
    text = text.strip()
    if text.lower() in UNLIMITED:
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if m is None:
        raise ValueError(f"not a SLURM time limit: {text!r}")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # days-hours[:minutes[:seconds]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # hours:minutes:seconds
        return (a * 60 + b) * 60 + c
    return a * 60 + (b or 0)  # minutes[:seconds]


def format_seconds(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def parse_job_size(text: str) -> tuple[int, int | None]:
    """sinfo %s, `min-max` nodes per job (`1-infinite`), as (min, max or None)."""
    low, _, high = text.strip().partition("-")
    high = high or low
    return int(low), None if high.lower() in UNLIMITED else int(high)


def parse_gpus(gres: str) -> int:
    """GPUs of one node from sinfo %G: `gpu:8`, `gpu:a100:4(S:0-1)`, `gpu:a:2,gpu:b:2,mps:100`, `(null)`."""
    return sum(int(m.group(1)) for m in re.finditer(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def parse_count(text: str) -> int:
    """CPUs or MB; sinfo appends '+' when nodes on one line differ (not with -N, but cheap to accept)."""
    return int(text.strip().rstrip("+"))


def parse_sinfo(text: str) -> dict[str, Partition]:
    """`sinfo --noheader -N -o SINFO_FORMAT` output → partitions by name."""
    rows: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        if line.strip():
            fields = line.split("|")
            if len(fields) != 9:
                raise ValueError(f"unexpected sinfo line: {line!r}")
            rows.setdefault(fields[0], []).append(fields)
    partitions = {}
    for name, lines in rows.items():
        first = lines[0]
        nodes = {f[8]: Node(f[8], parse_count(f[5]), parse_count(f[6]), parse_gpus(f[7])) for f in lines}
        min_nodes, max_nodes = parse_job_size(first[4])
        partitions[name] = Partition(name, first[1].endswith("*"), first[2].rstrip("*"), parse_time_limit(first[3]),
                                     min_nodes, max_nodes, tuple(nodes.values()))
    return partitions


def pick(partitions: dict[str, Partition], name: str | None) -> Partition:
    """The partition sbatch would use: `--partition`, else the default one."""
    known = ", ".join(sorted(partitions)) or "none"
    if name is None:
        default = [p for p in partitions.values() if p.default]
        if not default:
            raise ConfigError(f"this cluster has no default partition; choose one with --partition ({known})")
        return default[0]
    if name not in partitions:
        raise ConfigError(f"--partition {name}: no such partition on this cluster; use one of: {known}")
    return partitions[name]


def check_resources(r: Resources, p: Partition, nodes_option: str = "--nodes") -> None:
    """Raises ConfigError naming the first option of `r` that partition `p` cannot satisfy, so that the job
    is never queued to wait forever. `nodes_option`: where the node count came from (`launch.<kind>_nodes`)."""
    where = f"partition {p.name}"
    if p.avail != "up":
        raise ConfigError(f"{where} is {p.avail}, not up: jobs would wait until an admin brings it up; "
                          "choose another --partition")
    check_nodes(r, p, nodes_option)
    check_gpus(r, p)
    check_cpus(r, p)
    check_memory(r, p)
    check_time(r, p)
    check_whole_nodes(r, p, nodes_option)


def check_nodes(r: Resources, p: Partition, option: str) -> None:
    count = len(p.nodes)
    if r.nodes > count:
        raise ConfigError(f"{option} {r.nodes} asks for {r.nodes} nodes, but partition {p.name} has "
                          f"{count}; use {option} {count} or less")
    if p.max_nodes is not None and r.nodes > p.max_nodes:
        raise ConfigError(f"{option} {r.nodes} is over partition {p.name}'s limit of {p.max_nodes} node"
                          f"{'s' if p.max_nodes > 1 else ''} per job (MaxNodes); use {option} {p.max_nodes} or less")
    if r.nodes < p.min_nodes:
        raise ConfigError(f"{option} {r.nodes} is under partition {p.name}'s minimum of {p.min_nodes} nodes per "
                          f"job (MinNodes); use {option} {p.min_nodes} or more")


def check_gpus(r: Resources, p: Partition) -> None:
    most = p.largest("gpus")
    if r.gpus_per_node > most:
        has = f"nodes of at most {most} GPUs" if most else "no GPUs"
        gpus = f"{r.gpus_per_node} GPU{'s' if r.gpus_per_node > 1 else ''}"
        raise ConfigError(f"--gpus-per-node {r.gpus_per_node} asks for {gpus} per node, but partition {p.name} has "
                          f"{has}; use --gpus-per-node {most}" + (" or less" if most else ""))


def check_cpus(r: Resources, p: Partition) -> None:
    most, per_task = p.largest("cpus"), r.tasks_per_node
    need = r.cpus_per_task * per_task
    if need <= most:
        return
    tasks = f"{per_task} task{'s' if per_task > 1 else ''} per node"
    fits = most // per_task
    fix = (f"use --cpus-per-task {fits} or less" if fits else
           f"no --cpus-per-task fits {tasks}; use --gpus-per-node {most} or less")
    raise ConfigError(f"--cpus-per-task {r.cpus_per_task} × {tasks} needs {need} CPUs per node, but partition "
                      f"{p.name} has nodes of {'at most ' if len(set(n.cpus for n in p.nodes)) > 1 else ''}"
                      f"{most} CPUs; {fix}")


def check_memory(r: Resources, p: Partition) -> None:
    if not r.mem_gb:
        return
    need, most = max(1, round(r.mem_gb * 1024)), p.largest("mem_mb")  # MB as slurm_parameters asks
    if need > most:
        raise ConfigError(f"--mem-gb {r.mem_gb:g} asks for {need} MB per node, but partition {p.name} has nodes "
                          f"of at most {most} MB; use --mem-gb {math.floor(most / 1024 * 10) / 10:g} or less, "
                          "or leave it out for the partition's default")


def check_time(r: Resources, p: Partition) -> None:
    limit = p.time_limit_s
    if limit is not None and r.timeout_min * 60 > limit:
        raise ConfigError(f"--timeout {r.timeout_min} (minutes) is over partition {p.name}'s time limit of "
                          f"{format_seconds(limit)}; use --timeout {limit // 60} or less (jobs at their limit "
                          "are requeued and resume)")


def fits(r: Resources, n: Node) -> bool:
    mem = max(1, round(r.mem_gb * 1024)) if r.mem_gb else 0
    return (r.cpus_per_task * r.tasks_per_node <= n.cpus and r.gpus_per_node <= n.gpus and mem <= n.mem_mb)


def check_whole_nodes(r: Resources, p: Partition, option: str) -> None:
    """Mixed partitions: each request fits some node, but enough nodes must hold all of it at once."""
    count = sum(fits(r, n) for n in p.nodes)
    if count >= r.nodes:
        return
    mem = f", {r.mem_gb:g} GB" if r.mem_gb else ""
    ask = f"{r.cpus_per_task * r.tasks_per_node} CPUs, {r.gpus_per_node} GPUs{mem}"
    if not count:
        raise ConfigError(f"no node of partition {p.name} has {ask} at once; ask less of each node "
                          "(--cpus-per-task, --gpus-per-node, --mem-gb)")
    raise ConfigError(f"{option} {r.nodes}: only {count} node{'s' if count > 1 else ''} of partition {p.name} "
                      f"{'have' if count > 1 else 'has'} {ask} at once; use {option} {count} or less")


def read_partitions() -> dict[str, Partition]:
    """Every partition (hidden ones too) from one sinfo call; ConfigError when SLURM does not answer."""
    if shutil.which("sinfo") is None:
        raise ConfigError("cannot check the partition: this machine has no sinfo; submit from a login node")
    ping = run_quietly(["scontrol", "ping"])  # answers at once; sinfo waits ~10 s for a dead controller
    if ping is not None and " is UP" not in ping.stdout:
        raise ConfigError("the SLURM controller does not answer (scontrol ping: "
                          f"{(ping.stdout.strip().splitlines() or ['no output'])[0]}); try again when it is up")
    out = run_quietly(["sinfo", "--all", "--noheader", "-N", "-o", SINFO_FORMAT])
    if out is None or out.returncode != 0:
        why = f"no answer in {SINFO_TIMEOUT_S} s" if out is None else (out.stderr.strip() or "no message")
        raise ConfigError(f"cannot check the partition: sinfo failed ({why.splitlines()[0]})")
    try:
        return parse_sinfo(out.stdout)
    except ValueError as e:
        raise ConfigError(f"cannot check the partition: {e}") from e


def run_quietly(cmd: list[str]) -> subprocess.CompletedProcess | None:
    """The command's output; None when it is missing or hangs."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_jobs(jobs: list[tuple[Resources, str]], required: bool) -> str:
    """Checks every (resources, nodes option) against its partition; returns a line for the dry-run plan.
    Without SLURM on this machine and not `required` (a dry run), returns a note instead of checking."""
    if shutil.which("sinfo") is None and not required:
        return "partition not checked: no SLURM (sinfo) on this machine"
    partitions = read_partitions()
    checked = []
    for r, nodes_option in jobs:
        p = pick(partitions, r.partition)
        check_resources(r, p, nodes_option)
        checked.append(p.name)
    names = ", ".join(sorted(set(checked)))
    return f"partition {names}: every job fits (sinfo)"
