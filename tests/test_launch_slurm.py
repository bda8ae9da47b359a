"""tools/submit.py on the local SLURM cluster (tests/slurm_jobs.py): pretraining on 2 nodes, a job signalled for
its time limit (requeued, resumed), and `--cluster local` without SLURM. The pipeline and sweeps:
test_launch_slurm_pipeline.py."""
import json
import subprocess
import time

import pytest
import torch
from slurm_jobs import NODES, PRETRAIN, TERMINAL, job_states, losses, submit, wait_for

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def two_node_run(slurm, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm") / "pretrain"
    sub = submit("--cluster", "slurm", *NODES, "--stage", "pretrain", "--config", "configs/demo.yaml",
                 "--output", str(out), *PRETRAIN)
    wait_for(sub["jobs"][0]["job_ids"])
    return out


def test_pretraining_runs_on_two_slurm_nodes(two_node_run):
    run = json.loads((two_node_run / "run.json").read_text())
    assert run["world_size"] == 2 and run["nodes"] == ["node1", "node2"] and run["launcher"] == "slurm"
    assert run["finished"] is True and [s for s, _ in losses(two_node_run)] == list(range(1, 34))


def test_a_job_killed_while_it_requeues_itself_is_resumed_by_the_resubmission(two_node_run, tmp_path):
    """ADVCL_FAULT=launch.requeue (advcl_dist/faults.py): after SIGUSR2 every task has written its checkpoint and
    is about to requeue the job, and dies (SIGKILL). The job ends failed; the same submit command again resumes
    it to the uninterrupted run's losses."""
    command = ("--cluster", "slurm", *NODES, "--stage", "pretrain", "--config", "configs/demo.yaml", "--output",
               str(tmp_path), *PRETRAIN)
    job = submit(*command, env={"ADVCL_FAULT": "launch.requeue"})["jobs"][0]["job_ids"][0]
    deadline = time.time() + 300
    while not (tmp_path / "checkpoint.pt").exists():
        assert time.time() < deadline and job_states([job])[job].startswith(("PENDING", "RUNNING"))
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    while (state := job_states([job])[job].split()[0]) not in TERMINAL:
        assert time.time() < deadline
        time.sleep(0.5)
    assert state != "COMPLETED" and "Restarts=0" in subprocess.run(["scontrol", "show", "job", job],
                                                                   capture_output=True, text=True).stdout
    stopped = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    assert 5 <= stopped < 33
    wait_for(submit(*command)["jobs"][0]["job_ids"])
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["finished"] is True and run["resumes"][-1]["step"] == stopped
    assert losses(tmp_path) == losses(two_node_run)


def test_local_cluster_runs_the_same_pretraining(two_node_run, tmp_path):
    """Two local tasks instead of two nodes: the same 33 losses, without SLURM."""
    submit("--cluster", "local", *NODES, "--stage", "pretrain", "--config", "configs/demo.yaml",
           "--output", str(tmp_path), *PRETRAIN)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["world_size"] == 2 and run["finished"] is True
    assert losses(tmp_path) == losses(two_node_run)


def test_job_signalled_for_its_time_limit_is_requeued_and_resumes(two_node_run, tmp_path):
    sub = submit("--cluster", "slurm", *NODES, "--stage", "pretrain", "--config", "configs/demo.yaml",
                 "--output", str(tmp_path), *PRETRAIN)
    job = sub["jobs"][0]["job_ids"][0]
    deadline = time.time() + 300
    while not (tmp_path / "checkpoint.pt").exists():  # the first periodic checkpoint (step 5)
        assert time.time() < deadline and job_states([job])[job].startswith(("PENDING", "RUNNING"))
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before the time limit
    while "Restarts=1" not in subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                                             text=True).stdout:
        assert time.time() < deadline
        time.sleep(0.5)
    # SLURM holds a requeued job back until its old launch credential has expired (BeginTime, cred_expire + 1 s:
    # 11 s on the local cluster). Moving BeginTime to now races that expiry: slurmctld then kills the job as
    # "non-startable: Job credential revoked". So wait for it.
    wait_for([job])
    log = (tmp_path / "logs" / "pretrain" / f"{job}_0_log.out").read_text()
    stopped = int(log.split("[pretrain] stopped at step ")[1].split()[0])
    run = json.loads((tmp_path / "run.json").read_text())
    assert 5 <= stopped < 33 and run["resumes"][0]["step"] == stopped and run["finished"] is True
    assert f"resumed at step {stopped}" in log
    # Every step once, and the same losses as the uninterrupted run: nothing repeated, nothing lost.
    assert losses(tmp_path) == losses(two_node_run)


