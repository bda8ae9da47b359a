"""tools/submit.py refuses a job its SLURM partition can never run (advcl_dist/launch/partition.py).

The parsers run on sinfo output captured from the local cluster (slurm/local/start.sh) and on lines written in
sinfo's documented formats for what that cluster lacks (GPUs, mixed nodes, finite limits); the CLI runs against
the real local cluster (marker `slurm`). Its partition has no time limit (MaxTime=INFINITE), so a too-long
--timeout is tested on a parsed partition only, unless the cluster it finds has a finite one.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from advcl_dist.config import ConfigError
from advcl_dist.launch import Resources, main
from advcl_dist.launch.partition import (
    check_jobs,
    check_resources,
    parse_gpus,
    parse_job_size,
    parse_sinfo,
    parse_time_limit,
    pick,
    read_partitions,
)

ROOT = Path(__file__).resolve().parents[1]
# `sinfo --all --noheader -N -o '%R|%P|%a|%l|%s|%c|%m|%G|%N'` on the local cluster (2 nodes, 2-CPU machine)
LOCAL = """\
debug|debug*|up|infinite|1-infinite|2|8000|(null)|node1
debug|debug*|up|infinite|1-infinite|2|8000|(null)|node2
"""
# A mixed cluster in the same format: big CPU nodes and small GPU nodes, finite limits, a drained partition
MIXED = """\
cpu|cpu*|up|2-00:00:00|1-1|64|256000|(null)|c1
cpu|cpu*|up|2-00:00:00|1-1|64|256000|(null)|c2
gpu|gpu|up|12:00:00|2-infinite|16|64000|gpu:a100:4(S:0-1)|g1
gpu|gpu|up|12:00:00|2-infinite|16|64000|gpu:a100:2(S:0),gpu:v100:2(S:1),mps:100|g2
gpu|gpu|up|12:00:00|2-infinite|64|256000|(null)|c1
short|short|drain|30:00|1-infinite|2|8000|(null)|n1
"""
REPRO = ["--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "0", "--stage", "pretrain",
         "--config", "configs/demo.yaml"]


def fails(r: Resources, p, option: str = "--nodes") -> str:
    with pytest.raises(ConfigError) as e:
        check_resources(r, p, option)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("text, seconds", [
    ("infinite", None), ("UNLIMITED", None), ("1-00:00:00", 86400), ("2-12:30:15", 2 * 86400 + 45015),
    ("1-12", 129600), ("1-12:30", 131400), ("12:00:00", 43200), ("0:05:00", 300), ("30:00", 1800),
    ("45", 2700),
])
def test_time_limits_in_every_slurm_format(text, seconds):
    assert parse_time_limit(text) == seconds


def test_unknown_time_format_is_an_error():
    with pytest.raises(ValueError, match="not a SLURM time limit"):
        parse_time_limit("soon")


@pytest.mark.parametrize("gres, gpus", [
    ("(null)", 0), ("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:2(S:0),gpu:v100:2(S:1),mps:100", 4),
    ("mps:100,gpu:1", 1), ("shard:gpu:4", 0),
])
def test_gpus_per_node_from_gres(gres, gpus):
    assert parse_gpus(gres) == gpus


def test_job_size_limits():
    assert parse_job_size("1-infinite") == (1, None) and parse_job_size("2-8") == (2, 8)
    assert parse_job_size("4") == (4, 4)


def test_captured_local_partition():
    p = pick(parse_sinfo(LOCAL), None)
    assert (p.name, p.default, p.avail, p.time_limit_s, p.min_nodes, p.max_nodes) == ("debug", True, "up", None, 1,
                                                                                       None)
    assert [(n.name, n.cpus, n.mem_mb, n.gpus) for n in p.nodes] == [("node1", 2, 8000, 0), ("node2", 2, 8000, 0)]


def test_users_reproduction_names_cpus_per_task():
    """The default 10 CPUs per task on 2-CPU nodes: the job would stay PENDING (PartitionConfig) forever."""
    assert fails(Resources(nodes=2, gpus_per_node=0), pick(parse_sinfo(LOCAL), None)) == (
        "--cpus-per-task 10 × 1 task per node needs 10 CPUs per node, but partition debug has nodes of 2 CPUs; "
        "use --cpus-per-task 2 or less")


def test_each_limit_names_its_option():
    local = pick(parse_sinfo(LOCAL), None)
    small = dict(gpus_per_node=0, cpus_per_task=1)
    assert fails(Resources(nodes=3, **small), local).startswith("--nodes 3 asks for 3 nodes, but partition debug "
                                                                  "has 2; use --nodes 2")
    assert fails(Resources(nodes=3, **small), local, "launch.pretrain_nodes").startswith("launch.pretrain_nodes 3")
    assert "use --gpus-per-node 0" in fails(Resources(gpus_per_node=1, cpus_per_task=1), local)
    assert "use --mem-gb 7.8 or less" in fails(Resources(mem_gb=8, **small), local)
    check_resources(Resources(nodes=2, mem_gb=7.8, timeout_min=10**6, **small), local)  # no time limit


def test_finite_limits_of_a_mixed_cluster():
    parts = parse_sinfo(MIXED)
    cpu, gpu = pick(parts, None), pick(parts, "gpu")
    assert cpu.name == "cpu" and gpu.largest("gpus") == 4 and gpu.largest("cpus") == 64
    assert "use --timeout 2880 or less" in fails(Resources(gpus_per_node=0, timeout_min=2881), cpu)
    check_resources(Resources(gpus_per_node=0, timeout_min=2880), cpu)
    assert "(MaxNodes); use --nodes 1 or less" in fails(Resources(nodes=2, gpus_per_node=0), cpu)
    assert "(MinNodes); use --nodes 2 or more" in fails(Resources(nodes=1, gpus_per_node=4, cpus_per_task=4), gpu)
    assert "use --gpus-per-node 4 or less" in fails(Resources(nodes=2, gpus_per_node=8, cpus_per_task=1), gpu)
    assert "needs 65 CPUs per node, but partition cpu has nodes of 64 CPUs; use --cpus-per-task 64 or less" in \
        fails(Resources(gpus_per_node=0, cpus_per_task=65), cpu)
    assert "× 4 tasks per node needs 68 CPUs per node, but partition gpu has nodes of at most 64 CPUs; use " \
        "--cpus-per-task 16 or less" in fails(Resources(nodes=2, gpus_per_node=4, cpus_per_task=17), gpu)
    # 4 tasks × 8 CPUs fit the 64-CPU node, 4 GPUs the GPU nodes, but no node has both
    both = fails(Resources(nodes=2, gpus_per_node=4, cpus_per_task=8, timeout_min=60), gpu)
    assert both.startswith("no node of partition gpu has 32 CPUs, 4 GPUs at once")
    check_resources(Resources(nodes=2, gpus_per_node=4, cpus_per_task=4, timeout_min=720), gpu)
    assert fails(Resources(nodes=3, gpus_per_node=4, cpus_per_task=4, timeout_min=60), gpu) == (
        "--nodes 3: only 2 nodes of partition gpu have 16 CPUs, 4 GPUs at once; use --nodes 2 or less")
    assert "partition short is drain, not up" in fails(Resources(gpus_per_node=0), pick(parts, "short"))
    with pytest.raises(ConfigError, match="--partition nope: no such partition .* cpu, gpu, short"):
        pick(parts, "nope")
    with pytest.raises(ConfigError, match="no default partition; choose one with --partition"):
        pick(parse_sinfo(MIXED.replace("cpu*", "cpu")), None)


def test_dry_run_without_slurm_notes_the_skipped_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo, sbatch, srun
    assert main(["--dry-run", *REPRO, "--output", str(tmp_path / "run")]) == 0
    assert "# partition not checked: no SLURM (sinfo) on this machine" in capsys.readouterr().out


# ---- the real local cluster -----------------------------------------------------------------------------

def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/submit.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def refused(out: subprocess.CompletedProcess, folder: Path, option: str) -> None:
    """Exit 2, one `error:` line naming the option, and nothing queued or written."""
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.startswith(f"error: {option} ") and out.stderr.count("\n") == 1, out.stderr
    queued = subprocess.run(["squeue", "-h", "--states=all", "-o", "%o"], capture_output=True, text=True,
                            check=True).stdout  # %o: the sbatch script, under the run folder
    assert str(folder) not in queued and not folder.exists()


@pytest.mark.slurm
def test_users_reproduction_is_refused_before_sbatch(slurm, tmp_path):
    """The user's command as typed; the nodes have as many CPUs as this machine (2 here, under 10)."""
    cpus = pick(read_partitions(), None).largest("cpus")
    more = ["--cpus-per-task", str(cpus + 1)] if cpus >= 10 else []
    out = run_cli(*REPRO, *more, "--output", str(tmp_path / "run"))
    refused(out, tmp_path / "run", "--cpus-per-task")
    assert f"has nodes of {cpus} CPUs; use --cpus-per-task {cpus} or less" in out.stderr


@pytest.mark.slurm
def test_too_many_nodes_is_refused(slurm, tmp_path):
    nodes = len(pick(read_partitions(), None).nodes)
    out = run_cli(*REPRO, "--cpus-per-task", "1", "--nodes", str(nodes + 1), "--output", str(tmp_path / "run"))
    refused(out, tmp_path / "run", "--nodes")
    assert f"use --nodes {nodes} or less" in out.stderr


@pytest.mark.slurm
def test_time_limit_of_the_local_partition(slurm, tmp_path):
    p = pick(read_partitions(), None)
    if p.time_limit_s is None:  # MaxTime=INFINITE (slurm/local/start.sh): any --timeout passes
        check_resources(Resources(nodes=1, gpus_per_node=0, cpus_per_task=1, timeout_min=10**6), p)
        return
    out = run_cli(*REPRO, "--cpus-per-task", "1", "--timeout", str(p.time_limit_s // 60 + 1),
                  "--output", str(tmp_path / "run"))
    refused(out, tmp_path / "run", "--timeout")


@pytest.mark.slurm
def test_a_request_that_fits_passes(slurm):
    r = Resources(nodes=2, gpus_per_node=0, cpus_per_task=1, timeout_min=20)
    assert check_jobs([(r, "--nodes")], required=True) == "partition debug: every job fits (sinfo)"
    check_resources(r, pick(read_partitions(), "debug"))


@pytest.mark.slurm
def test_dry_run_reports_the_problem_in_its_plan(slurm, tmp_path):
    out = run_cli("--dry-run", *REPRO, "--output", str(tmp_path / "run"))
    assert out.returncode == 0 and out.stderr.startswith("warning: --cpus-per-task 10 ")
    assert "# partition check FAILED, a submission would stop here: --cpus-per-task 10" in out.stdout
    fits = run_cli("--dry-run", *REPRO, "--cpus-per-task", "1", "--output", str(tmp_path / "run"))
    assert fits.returncode == 0 and "# partition debug: every job fits (sinfo)" in fits.stdout


@pytest.mark.slurm
def test_controller_that_does_not_answer(slurm, tmp_path):
    """A slurm.conf naming a port nobody listens on: scontrol ping says DOWN at once (sinfo would wait)."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    dead = tmp_path / "slurm.conf"
    dead.write_text("\n".join("SlurmctldPort=6999" if line.startswith("SlurmctldPort=") else line
                              for line in conf.splitlines()) + "\n")
    env = {**os.environ, "SLURM_CONF": str(dead)}
    out = run_cli(*REPRO, "--cpus-per-task", "1", "--output", str(tmp_path / "run"), env=env)
    assert out.returncode == 2 and "error: the SLURM controller does not answer" in out.stderr
    dry = run_cli("--dry-run", *REPRO, "--cpus-per-task", "1", "--output", str(tmp_path / "run"), env=env)
    assert dry.returncode == 0 and "# partition check FAILED, a submission would stop here: the SLURM controller" \
        in dry.stdout
