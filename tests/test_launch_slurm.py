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


COMMAND = ("--cluster", "slurm", *NODES, "--stage", "pretrain", "--config", "configs/demo.yaml", *PRETRAIN)


def show_job(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout


def signalled_mid_training(root, env: dict | None = None, attempts: int = 3) -> tuple[str, object]:
    """Submit the 33-step pretraining, wait for its first periodic checkpoint (step 5) and send SIGUSR2, what
    SLURM sends before the time limit. Returns the job and its folder once the job has reacted (requeued
    itself, or ended other than COMPLETED). The job takes seconds, so on a loaded machine it can finish
    before the signal lands (scancel: invalid job id, or the job COMPLETED without a restart): that attempt
    proves nothing either way, and the job is submitted again into a new folder."""
    for attempt in range(attempts):
        out = root / f"attempt{attempt}"
        job = submit(*COMMAND, "--output", str(out), env=env)["jobs"][0]["job_ids"][0]
        deadline = time.time() + 300
        while not (out / "checkpoint.pt").exists():
            assert time.time() < deadline and job_states([job])[job].startswith(("PENDING", "RUNNING"))
            time.sleep(0.2)
        signalled = subprocess.run(["scancel", "--signal=USR2", job], capture_output=True).returncode == 0
        while signalled:
            state, shown = job_states([job])[job].split()[0], show_job(job)
            if "Restarts=0" not in shown or (state in TERMINAL and state != "COMPLETED"):
                return job, out
            if state == "COMPLETED":
                break
            assert time.time() < deadline
            time.sleep(0.5)
        wait_for([job])
    pytest.fail(f"the pretraining job ended before SIGUSR2 reached it in all {attempts} attempts (machine too loaded)")


def test_a_job_killed_while_it_requeues_itself_is_resumed_by_the_resubmission(two_node_run, tmp_path):
    """ADVCL_FAULT=launch.requeue (advcl_dist/faults.py): after SIGUSR2 every task has written its checkpoint and
    is about to requeue the job, and dies (SIGKILL). The job ends failed; the same submit command again resumes
    it to the uninterrupted run's losses."""
    job, out = signalled_mid_training(tmp_path, env={"ADVCL_FAULT": "launch.requeue"})
    assert job_states([job])[job].split()[0] in TERMINAL - {"COMPLETED"} and "Restarts=0" in show_job(job)
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 5 <= stopped < 33
    wait_for(submit(*COMMAND, "--output", str(out))["jobs"][0]["job_ids"])
    run = json.loads((out / "run.json").read_text())
    assert run["finished"] is True and run["resumes"][-1]["step"] == stopped
    assert losses(out) == losses(two_node_run)


def test_local_cluster_runs_the_same_pretraining(two_node_run, tmp_path):
    """Two local tasks instead of two nodes: the same 33 losses, without SLURM."""
    submit("--cluster", "local", *NODES, "--stage", "pretrain", "--config", "configs/demo.yaml",
           "--output", str(tmp_path), *PRETRAIN)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["world_size"] == 2 and run["finished"] is True
    assert losses(tmp_path) == losses(two_node_run)


def test_job_signalled_for_its_time_limit_is_requeued_and_resumes(two_node_run, tmp_path):
    job, out = signalled_mid_training(tmp_path)
    assert "Restarts=1" in show_job(job)
    # SLURM holds a requeued job back until its old launch credential has expired (BeginTime, cred_expire + 1 s:
    # 11 s on the local cluster). Moving BeginTime to now races that expiry: slurmctld then kills the job as
    # "non-startable: Job credential revoked". So wait for it.
    wait_for([job])
    log = (out / "logs" / "pretrain" / f"{job}_0_log.out").read_text()
    stopped = int(log.split("[pretrain] stopped at step ")[1].split()[0])
    run = json.loads((out / "run.json").read_text())
    assert 5 <= stopped < 33 and run["resumes"][0]["step"] == stopped and run["finished"] is True
    assert f"resumed at step {stopped}" in log
    # Every step once, and the same losses as the uninterrupted run: nothing repeated, nothing lost.
    assert losses(out) == losses(two_node_run)


