"""tools/submit.py on a real SLURM cluster: two slurmd nodes on this machine (slurm/local/start.sh).

Pretraining on 2 nodes, a job signalled for its time limit (requeued, resumed), the chained
pipeline with every stage (finetuning and evaluation too) as a 2-node job, a sweep as job arrays +
tools/report.py, and `--cluster local` without SLURM.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# 33 steps on the demo data, with a narrow network: what is tested is the launch, not the model
PRETRAIN = ["train.epochs=3", "train.log_every=1", "train.ckpt_every=5", "model.width=4", "model.proj_dim=16"]
TINY = ["model.width=4", "model.proj_dim=16", "train.batch_size=256", "train.epochs=1", "optim.warmup_epochs=0",
        "attack.steps=1", "pseudo.ks=[2,10]", "finetune.epochs=1", "finetune.batch_size=256", "attack.eval_steps=1",
        "eval.autoattack=false", "eval.batch_size=120", "pipeline.finetune=[slf]", "pipeline.baselines=[simclr]"]
NODES = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--timeout", "20"]


@pytest.fixture(scope="module")
def slurm():
    """The local cluster, started through slurm/local/start.sh when it is not up."""
    def two_nodes_up() -> bool:
        if shutil.which("sinfo") is None:
            return False
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True)
        return out.returncode == 0 and sum(line.split()[1] in ("idle", "mix", "alloc")
                                           for line in out.stdout.splitlines()) >= 2

    if not two_nodes_up():
        missing = [c for c in ("slurmctld", "slurmd", "munged") if shutil.which(c) is None
                   and not Path("/usr/sbin", c).exists()]
        if missing or os.geteuid() != 0:
            reason = f"SLURM is needed (missing {missing or 'root'}): make install as root installs slurm-wlm, munge"
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
        subprocess.run(["bash", str(ROOT / "slurm/local/start.sh"), "2"], check=True, timeout=180)
    assert two_nodes_up()


def submit(*argv: str) -> dict:
    """Run tools/submit.py; returns the last submission of <output>/submit.json."""
    out = subprocess.run([sys.executable, "tools/submit.py", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    output = Path(argv[argv.index("--output") + 1])
    return json.loads((output / "submit.json").read_text())["submissions"][-1]


def job_states(ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i %T %r", "-j", ",".join(ids)],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines()}


def wait_for(ids: list[str], timeout: float = 600) -> None:
    """Until every job (and array task) has ended; fails on any end but COMPLETED."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = job_states(ids)
        if any("DependencyNeverSatisfied" in s for s in states.values()):
            pytest.fail(f"a job will never run: {states}")
        if states and all(s.split()[0] in TERMINAL for s in states.values()):
            assert all(s.startswith("COMPLETED") for s in states.values()), states
            return
        time.sleep(2)
    pytest.fail(f"jobs still running after {timeout} s: {job_states(ids)}")


def losses(folder: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


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


@pytest.fixture(scope="module")
def pipeline_run(slurm, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm") / "pipeline"
    sub = submit("--cluster", "slurm", *NODES, "--stage", "pipeline", "--config", "configs/demo.yaml",
                 "--output", str(out), *TINY)
    wait_for([i for job in sub["jobs"] for i in job["job_ids"]])
    return out, sub


def test_pipeline_runs_as_chained_jobs_to_results(pipeline_run):
    out, sub = pipeline_run
    jobs = {j["stage"]: j for j in sub["jobs"]}
    assert list(jobs) == ["simclr", "cluster", "advcl", "advcl-slf", "simclr-slf", "summary"]
    assert jobs["simclr"]["dependency"] is None
    assert jobs["cluster"]["dependency"] == f"afterok:{jobs['simclr']['job_ids'][0]}"
    assert jobs["advcl"]["dependency"] == f"afterok:{jobs['cluster']['job_ids'][0]}"
    assert jobs["advcl-slf"]["dependency"] == f"afterok:{jobs['advcl']['job_ids'][0]}"
    for stage in ("simclr", "advcl"):
        run = json.loads((out / stage / "run.json").read_text())
        assert run["world_size"] == 2 and run["nodes"] == ["node1", "node2"] and run["finished"] is True
    assert json.loads((out / "cluster" / "clusters.json").read_text())["world_size"] == 2
    for stage in ("advcl-slf", "simclr-slf"):  # finetuning and its evaluation: one job on both nodes
        run = json.loads((out / stage / "run.json").read_text())
        assert run["stage"] == "finetune" and run["world_size"] == 2 and run["nodes"] == ["node1", "node2"]
        assert run["finished"] is True and run["launcher"] == "slurm"
        result = json.loads((out / stage / "results.json").read_text())
        assert result["dataset"] == "digits" and result["n_test"] == 360 and 0 <= result["RA"] <= result["SA"]
        assert result["world_size"] == 2  # 3 evaluation blocks of 120 images over 2 ranks
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["method"], r["finetune"]) for r in rows] == [("advcl", "slf"), ("simclr", "slf")]


def test_sweep_runs_as_job_arrays_and_report_tabulates_it(pipeline_run, tmp_path):
    fpre = pipeline_run[0] / "simclr" / "checkpoint.pt"
    sub = submit("--cluster", "slurm", *NODES, "--sweep", "configs/sweeps/demo_k.yaml", "--output", str(tmp_path),
                 *TINY, f"pseudo.fpre={fpre}")
    jobs = {j["stage"]: j for j in sub["jobs"]}
    assert list(jobs) == ["cluster", "advcl", "advcl-slf", "summary"]
    array = jobs["cluster"]["job_ids"][0].split("_")[0]
    assert jobs["cluster"]["job_ids"] == [f"{array}_0", f"{array}_1"]
    assert jobs["advcl"]["dependency"] == f"aftercorr:{array}"
    wait_for([i for job in sub["jobs"] for i in job["job_ids"]])
    points = ["00-ks=10", "01-ks=2,10,50"]
    for point, ks in zip(points, ([10], [2, 10, 50])):
        assert json.loads((tmp_path / point / "cluster" / "clusters.json").read_text())["ks"] == ks
    report = subprocess.run([sys.executable, "tools/report.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    lines = report.splitlines()
    assert lines[0].startswith("| run | pseudo.ks | method | finetune | dataset | SA | RA | AA |")
    assert lines[2].startswith("| 00-ks=10/advcl-slf | [10] | advcl | SLF | digits |")
    assert lines[3].startswith("| 01-ks=2,10,50/advcl-slf | [2,10,50] | advcl | SLF | digits |")
    assert len(lines) == 4 and (tmp_path / "report.csv").is_file()
