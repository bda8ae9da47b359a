"""Where a process sits in a launch (torchrun, SLURM, alone), SyncBN on gloo, and the CLI under real launchers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import free_port, run_ranks

from advcl_dist.distributed import distributed_session, launch_env
from advcl_dist.models.sync_bn import GlobalBatchNorm

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID",
              "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NODEID")
TINY = ["data.name=digits", "data.workers=0", "train.device=cpu", "train.method=simclr", "model.width=4",
        "model.proj_dim=16", "train.batch_size=64", "train.epochs=1", "optim.warmup_epochs=0", "train.log_every=1"]


def clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS + SLURM_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def slurm_env(monkeypatch, job_id, procid, nodelist="node[3-4]", **extra):
    for key in LAUNCH_VARS + SLURM_VARS:
        monkeypatch.delenv(key, raising=False)
    values = {"SLURM_JOB_ID": job_id, "SLURM_PROCID": procid, "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
              "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": "2",
              "SLURM_NODEID": procid, **extra}
    for key, value in values.items():
        monkeypatch.setenv(key, str(value))


def test_torchrun_variables_take_precedence(monkeypatch):
    slurm_env(monkeypatch, 77, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = launch_env()
    assert (env.rank, env.world_size, env.local_rank, env.init_method, env.launcher) == (3, 8, 1, "env://",
                                                                                         "torchrun")


def test_slurm_tasks_agree_on_the_master_without_talking(monkeypatch):
    """Master = first host of the node list; the port is a function of the job id, the same for every task."""
    seen = []
    for procid in (0, 1):
        slurm_env(monkeypatch, 123456, procid)
        seen.append(launch_env())
    assert [(e.rank, e.world_size, e.launcher) for e in seen] == [(0, 2, "slurm"), (1, 2, "slurm")]
    assert seen[0].init_method == seen[1].init_method
    host, port = seen[0].init_method.removeprefix("tcp://").rsplit(":", 1)
    assert host == "node3" and 20000 <= int(port) <= 60000
    slurm_env(monkeypatch, 123457, 0)
    assert launch_env().init_method != seen[0].init_method  # another job, another port


def test_without_an_srun_step_a_slurm_allocation_is_one_process(monkeypatch):
    """`python tools/pretrain.py` typed in an salloc shell must not wait for tasks that will never start."""
    slurm_env(monkeypatch, 99, 0)
    monkeypatch.delenv("SLURM_STEP_ID")
    assert launch_env() is None


def _batch_norm_rank():
    torch.set_default_dtype(torch.float64)
    x, w = _bn_data()
    with distributed_session("cpu"):
        rank = dist.get_rank()
        bn = _bn(GlobalBatchNorm(3))
        part = x[rank * 5:(rank + 1) * 5].clone().requires_grad_(True)  # uneven shards: 5 and 3 rows
        out = bn(part)
        (out * w[rank * 5:(rank + 1) * 5]).sum().backward()
        return out.detach(), part.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _bn_data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) * 3 + 2,
            torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64))


def _bn(bn):
    bn = bn.double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


def test_sync_batch_norm_on_gloo_equals_batch_norm_on_the_concatenated_batch():
    """Outputs, input and parameter gradients (summed over ranks) and running statistics, float64."""
    ranks = run_ranks(2, _batch_norm_rank)
    x, w = _bn_data()
    x.requires_grad_(True)
    bn = _bn(torch.nn.BatchNorm2d(3))
    (bn(x) * w).sum().backward()
    out, x_grad = torch.cat([r[0] for r in ranks]), torch.cat([r[1] for r in ranks])
    expected = _bn(torch.nn.BatchNorm2d(3))(x.detach())
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.allclose(x_grad, x.grad, atol=1e-12)
    assert torch.allclose(ranks[0][2] + ranks[1][2], bn.weight.grad, atol=1e-12)
    assert torch.allclose(ranks[0][3] + ranks[1][3], bn.bias.grad, atol=1e-12)
    for r in ranks:
        assert torch.allclose(r[4], bn.running_mean, atol=1e-12) and torch.allclose(r[5], bn.running_var, atol=1e-12)


def _check_two_rank_run(out: Path, launcher: str, results):
    for proc in results:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and len(run["nodes"]) == 2 and run["launcher"] == launcher
    assert run["finished"] and torch.load(out / "checkpoint.pt", weights_only=False)["world_size"] == 2
    assert "2 ranks × 32 images" in "".join(p.stdout for p in results)


def test_torchrun_two_nodes_on_loopback(tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 1`, one torchrun per "node", rendezvous on 127.0.0.1."""
    out, port = tmp_path / "run", free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), str(ROOT / "tools" / "pretrain.py"), f"out_dir={out}", *TINY],
                              cwd=ROOT, env=clean_env({}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    results = [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]
    _check_two_rank_run(out, "torchrun", results)


def test_two_slurm_tasks_train_together(tmp_path):
    """Two processes with the environment `srun --ntasks 2` gives its tasks (job id → port, first node → master)."""
    out = tmp_path / "run"
    job = str(40000 + os.getpid() % 10000)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tools" / "pretrain.py"), f"out_dir={out}", *TINY],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env({"SLURM_JOB_ID": job, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2",
                                             "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": "0",
                                             "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1",
                                             "SLURM_NODEID": "0"}))
             for rank in (0, 1)]
    results = [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]
    _check_two_rank_run(out, "slurm", results)


def test_indivisible_global_batch_through_the_cli_names_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           str(ROOT / "tools" / "pretrain.py"), f"out_dir={tmp_path / 'run'}", *TINY,
                           "train.batch_size=63"], cwd=ROOT, env=clean_env({}), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "train.batch_size=63 is not divisible by the 2 ranks" in proc.stdout + proc.stderr
