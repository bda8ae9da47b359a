"""The pretraining CLI as a user runs it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.name=digits", "model.width=4", "model.proj_dim=16", "train.batch_size=256", "train.epochs=1",
        "optim.warmup_epochs=0", "attack.steps=1", "train.log_every=2"]


def tool(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def pretrain(*args):
    return tool("pretrain", *args)


def test_tiny_run_writes_the_run_folder_and_a_rerun_does_nothing(tmp_path):
    out = tmp_path / "run"
    first = pretrain("--config", str(ROOT / "configs" / "demo.yaml"), f"out_dir={out}", *TINY)
    assert first.returncode == 0, first.stderr
    for name in ("checkpoint.pt", "config.yaml", "run.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 5]  # 1437 // 256 = 5 steps; logged every 2 and at the end
    second = pretrain("--config", str(ROOT / "configs" / "demo.yaml"), f"out_dir={out}", *TINY)
    assert second.returncode == 0 and "already finished" in second.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_sigusr2_inside_a_slurm_job_stops_at_a_step_with_a_checkpoint_and_the_rerun_resumes(tmp_path):
    """What slurm/examples/ rely on: SLURM's time-limit signal ends pretraining cleanly, nothing lost."""
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "tools/pretrain.py"), "--config", str(ROOT / "configs/demo.yaml"),
            f"out_dir={out}", *TINY, "train.epochs=4", "train.ckpt_every=1000", "train.log_every=1"]
    env = {**os.environ, "SLURM_JOB_ID": "7"}  # a plain `python` in an sbatch script (no srun step): one rank
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 3):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    stopped = int(stdout.split("[pretrain] stopped at step ")[1].split()[0])
    assert 3 <= stopped < 20
    assert json.loads((out / "run.json").read_text())["stopped_by_signal"] is True
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"resumed at step {stopped}" in resumed.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["finished"] is True and [r["step"] for r in run["resumes"]] == [stopped]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # 4 epochs × 5 steps, each logged once


def test_unknown_key_fails_before_any_work(tmp_path):
    res = pretrain("--config", str(ROOT / "configs" / "demo.yaml"), f"out_dir={tmp_path / 'x'}", "train.lrr=1")
    assert res.returncode == 2
    assert "unknown config key 'train.lrr'" in res.stderr
    assert not (tmp_path / "x").exists()


def test_missing_dataset_names_the_path_and_the_fix(tmp_path):
    res = pretrain("--config", str(ROOT / "configs" / "cifar10_advcl.yaml"), f"data.root={tmp_path / 'nothing'}",
                   f"out_dir={tmp_path / 'x'}")
    assert res.returncode == 2
    assert str(tmp_path / "nothing") in res.stderr and "data.download=true" in res.stderr
    assert "Traceback" not in res.stderr


def test_finetune_of_a_missing_checkpoint_names_it_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    res = tool("finetune", "--config", str(ROOT / "configs" / "demo.yaml"), f"finetune.checkpoint={missing}",
               f"out_dir={tmp_path / 'x'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(missing) in res.stderr and "pretrain first" in res.stderr


def test_every_tool_explains_itself():
    for name in ("pretrain", "cluster", "finetune", "evaluate", "pipeline"):
        res = tool(name, "--help")
        assert res.returncode == 0 and "--config" in res.stdout and "key=value" in res.stdout, name
