"""tools/submit.py without a cluster: the plan, the sbatch scripts, sweeps, errors, and the stop agreement.

The jobs themselves run on the real local SLURM in test_launch_slurm.py.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from advcl_dist.engine.preemption import StopRequest, stop_on_signal
from advcl_dist.launch import main, read_sweep
from advcl_dist.report import gather, write_report
from tests.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def dry_run(capsys, *argv):
    assert main(["--dry-run", *argv]) == 0
    return capsys.readouterr().out


def sbatch_blocks(out: str) -> dict[str, str]:
    """job name → its sbatch script, from the dry-run output."""
    blocks = {}
    for part in out.split("# ---- job ")[1:]:
        blocks[part.split(":", 1)[0]] = part
    return blocks


def test_default_is_the_papers_cifar10_pipeline_chained_with_afterok(capsys, tmp_path):
    out = dry_run(capsys, "--nodes", "4", "--output", str(tmp_path / "c10"))
    assert "name: cifar10" in out and "epochs: 1000" in out and f"out_dir: {tmp_path / 'c10'}" in out
    jobs = sbatch_blocks(out)
    assert list(jobs) == ["simclr", "cluster", "advcl", "advcl-slf", "simclr-slf", "summary"]
    for name in ("simclr", "cluster", "advcl", "advcl-slf", "simclr-slf"):  # every stage: every GPU of every node
        assert "#SBATCH --nodes=4" in jobs[name] and "#SBATCH --ntasks-per-node=8" in jobs[name]
        assert "#SBATCH --gpus-per-node=8" in jobs[name]
    assert "#SBATCH --nodes=1" in jobs["summary"] and "gpus-per-node" not in jobs["summary"]
    assert "#SBATCH --dependency='afterok:<simclr>'" in jobs["cluster"]
    assert "#SBATCH --dependency='afterok:<cluster>'" in jobs["advcl"]
    assert "#SBATCH --dependency='afterok:<advcl>'" in jobs["advcl-slf"]
    assert "#SBATCH --dependency='afterok:<simclr>:<cluster>:<advcl>:<advcl-slf>:<simclr-slf>'" in jobs["summary"]
    for script in jobs.values():  # time-limit warning and requeue, the srun line submitit runs
        assert "#SBATCH --signal=USR2@120" in script and "#SBATCH --requeue" in script
        assert "srun --unbuffered" in script and "submitit.core._submit" in script
    assert not (tmp_path / "c10").exists()  # a dry run writes nothing


def test_nodes_per_kind_of_stage_come_from_the_config(capsys, tmp_path):
    out = dry_run(capsys, "--nodes", "4", "--output", str(tmp_path / "c10"), "launch.finetune_nodes=2",
                  "launch.cluster_nodes=1")
    jobs = sbatch_blocks(out)
    assert "#SBATCH --nodes=4" in jobs["advcl"] and "#SBATCH --nodes=1" in jobs["cluster"]
    for name in ("advcl-slf", "simclr-slf"):
        assert "#SBATCH --nodes=2" in jobs[name] and "#SBATCH --ntasks-per-node=8" in jobs[name]


def test_cluster_options_reach_sbatch(capsys, tmp_path):
    out = dry_run(capsys, "--stage", "pretrain", "--config", "configs/demo.yaml", "--output", str(tmp_path),
                  "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "3", "--mem-gb", "16",
                  "--partition", "p1", "--account", "a1", "--qos", "high", "--constraint", "a100",
                  "--exclude", "n[1-2]", "--comment", "c1", "--timeout", "90", "train.epochs=5")
    script = sbatch_blocks(out)["pretrain"]
    for line in ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=3", "--mem=16384MB", "--partition=p1",
                 "--account=a1", "--qos=high", "--constraint=a100", "--exclude='n[1-2]'", "--comment=c1",
                 "--time=90"):
        assert f"#SBATCH {line}" in script, line
    assert "gpus-per-node" not in script and "epochs: 5" in out


def test_single_stage_needs_its_input_before_it_queues(tmp_path, capsys):
    assert main(["--dry-run", "--stage", "finetune", "--config", "configs/demo.yaml", "--output", str(tmp_path)]) == 2
    assert "--stage finetune needs finetune.checkpoint=PATH" in capsys.readouterr().err
    assert main(["--dry-run", "--stage", "cluster", "--config", "configs/demo.yaml", "--output", str(tmp_path),
                 "pseudo.fpre=/nonexistent/checkpoint.pt"]) == 2
    assert "pseudo.fpre=/nonexistent/checkpoint.pt does not exist" in capsys.readouterr().err


def test_slurm_without_sbatch_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    code = main(["--stage", "pretrain", "--config", "configs/demo.yaml", "--output", str(tmp_path / "run"),
                 "--gpus-per-node", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "needs SLURM's sbatch and srun on PATH" in err and "--cluster local" in err


def test_output_must_be_writable_and_is_made_absolute(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--dry-run", "--config", "configs/demo.yaml", "--output", str(blocker / "run")]) == 2
    assert "is not a writable folder" in capsys.readouterr().err
    assert main(["--dry-run", "--config", "configs/demo.yaml", "--output", "x", "out_dir=y"]) == 2
    assert "--output DIR, not out_dir=" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    out = dry_run(capsys, "--config", str(ROOT / "configs/demo.yaml"), "--gpus-per-node", "0")
    assert f"# output: {tmp_path}/runs/demo-" in out


def test_sweep_points_folders_and_arrays(tmp_path, capsys):
    sweep = tmp_path / "k.yaml"
    sweep.write_text("config: configs/demo.yaml\noverrides: {pipeline.baselines: []}\n"
                     "grid:\n  pseudo.ks: [[10], [2, 10, 50]]\n  optim.lr: [0.1, 0.2]\n")
    spec, points = read_sweep(sweep)
    assert [p.folder for p in points] == ["00-ks=10_lr=0.1", "01-ks=10_lr=0.2", "02-ks=2,10,50_lr=0.1",
                                          "03-ks=2,10,50_lr=0.2"]
    assert points[2].values == {"pipeline.baselines": [], "pseudo.ks": [2, 10, 50], "optim.lr": 0.1}
    assert points[2].swept == {"pseudo.ks": [2, 10, 50], "optim.lr": 0.1}
    out = dry_run(capsys, "--sweep", str(sweep), "--output", str(tmp_path / "out"), "--gpus-per-node", "0",
                  "pseudo.fpre=configs/demo.yaml")  # any existing file: nothing runs
    jobs = sbatch_blocks(out)
    assert list(jobs) == ["cluster", "advcl", "advcl-slf", "summary"]  # no SimCLR: f_pre is given
    assert "#SBATCH --array=0-3%4" in jobs["cluster"] and "#SBATCH --dependency='aftercorr:<cluster>'" in jobs["advcl"]
    assert f"# folder: {tmp_path / 'out' / '00-ks=10_lr=0.1' / 'cluster'}" in out


@pytest.mark.parametrize("text, message", [
    ("grid: {}", "'grid' must map dotted keys to non-empty lists"),
    ("grid: {pseudo.ks: [[2]]}\nextra: 1", "unknown keys ['extra']"),
    ("grid: {pseudo.nope: [1]}", "unknown config key 'pseudo.nope'"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, capsys, text, message):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(text)
    assert main(["--dry-run", "--sweep", str(sweep), "--config", "configs/demo.yaml", "--output",
                 str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_report_tables_a_sweep_with_its_swept_values(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"points": [
        {"folder": "00-ks=10", "swept": {"pseudo.ks": [10]}, "overrides": {"pseudo.ks": [10], "a.b": 1}},
        {"folder": "01-ks=2,10", "swept": {"pseudo.ks": [2, 10]}, "overrides": {"pseudo.ks": [2, 10], "a.b": 1}}]}))
    for folder, sa, aa in (("00-ks=10", 80.0, None), ("01-ks=2,10", 81.234, 40.5)):
        out = tmp_path / folder / "advcl-slf"
        out.mkdir(parents=True)
        result = {"dataset": "cifar10", "method": "advcl", "finetune": "slf", "SA": sa, "RA": 50.0, "AA": aa,
                  "n_test": 10000}
        if aa is not None:
            result["aa_subset"] = {"n": 1000}
        (out / "results.json").write_text(json.dumps(result))
    columns, rows = gather(tmp_path)
    assert columns == ["run", "pseudo.ks", "method", "finetune", "dataset", "SA", "RA", "AA", "n_test", "AA_n"]
    assert [(r["run"], r["pseudo.ks"], r["AA_n"]) for r in rows] == [
        ("00-ks=10/advcl-slf", [10], None), ("01-ks=2,10/advcl-slf", [2, 10], 1000)]
    table, n = write_report(tmp_path)
    assert n == 2 and "| 01-ks=2,10/advcl-slf | [2,10] | advcl | SLF | cifar10 | 81.23 | 50.00 | 40.50 |" in table
    csv_row = (tmp_path / "report.csv").read_text().splitlines()[2]
    assert csv_row.startswith('"01-ks=2,10/advcl-slf","[2, 10]",advcl,SLF,cifar10,81.234,')
    cli = subprocess.run([sys.executable, "tools/report.py", str(tmp_path / "00-ks=10" / "nothing")],
                         cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 2 and "is not a folder" in cli.stderr


def _agree(flag_rank: int, flag_step: int, steps: int) -> list[tuple[int, bool]]:
    """Each rank's (boundary, agreed) trace; rank `flag_rank` receives the signal during step `flag_step`."""
    dist.init_process_group("gloo")
    try:
        with stop_on_signal(signal.SIGUSR2) as request:
            trace = []
            for step in range(1, steps + 1):
                if dist.get_rank() == flag_rank and step == flag_step:
                    os.kill(os.getpid(), signal.SIGUSR2)
                trace.append((step, request.agreed()))
                if trace[-1][1]:
                    break
            request.close()
        return trace
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_stop_at_the_same_step_boundary():
    traces = run_ranks(2, _agree, 1, 3, 10)
    assert traces[0] == traces[1]  # same boundaries, same decision
    assert traces[0][-1] == (4, True) and not any(stop for _, stop in traces[0][:-1])


def test_one_process_stops_at_once_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGUSR2)
    with stop_on_signal(signal.SIGUSR2) as request:
        assert not request.agreed()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert request.agreed()
    assert signal.getsignal(signal.SIGUSR2) is before
    assert StopRequest().agreed() is False


def test_table1_sweep_dry_run_lists_every_method_and_mode_with_its_dependencies(capsys, tmp_path):
    """configs/sweeps/table1.yaml: one array of 2 (CIFAR-10, CIFAR-100) per stage; every method × SLF/ALF/AFF;
    each job waits for what it reads: f_pre → cluster → AdvCL, the teacher → DeACL, DynACL++'s own features →
    its clustering → its post-processing → its finetunings."""
    out = dry_run(capsys, "--sweep", "configs/sweeps/table1.yaml", "--nodes", "4", "--output", str(tmp_path / "t1"))
    jobs = sbatch_blocks(out)
    methods = ["advcl", "supervised_at", "apdpe", "rocl", "acl", "dynacl", "dynacl++", "dynacl_air", "dynacl_air++",
               "deacl"]
    waits = {"simclr": None, "cluster": "simclr", "advcl": "cluster", "deacl": "simclr", "supervised_at": None,
             "dynacl++-cluster": "dynacl++", "dynacl++-post": "dynacl++-cluster",
             "dynacl_air++-cluster": "dynacl_air++", "dynacl_air++-post": "dynacl_air++-cluster"}
    for method in methods:
        for mode in ("slf", "alf", "aff"):
            waits[f"{method}-{mode}"] = f"{method}-post" if method.endswith("++") else method
    assert set(jobs) == {*waits, *methods, "summary"}
    for name, script in jobs.items():
        assert "#SBATCH --array=0-1%2" in script or name == "summary", name
        needed = waits.get(name)
        if needed is not None:
            assert f"#SBATCH --dependency='aftercorr:<{needed}>'" in script, name
        elif name != "summary":
            assert "--dependency" not in script, name
    assert '# sweep point 00-name=cifar10: {"data.name": "cifar10"}' in out
    assert '# sweep point 01-name=cifar100: {"data.name": "cifar100"}' in out


def test_a_sweep_over_seeds_makes_one_point_per_seed_and_refuses_seeds_in_overrides(capsys, tmp_path):
    out = dry_run(capsys, "--sweep", "configs/sweeps/demo_seeds.yaml", "--output", str(tmp_path / "s"))
    for seed in (0, 1, 2):
        assert f'# sweep point 0{seed}-seed={seed}: {{"train.seed": {seed}}}' in out
    assert sbatch_blocks(out)["advcl"].count("array of 3") == 1
    sweep = tmp_path / "bad.yaml"
    sweep.write_text("config: configs/demo.yaml\noverrides: {train.seed: [0, 1]}\ngrid: {data.name: [digits]}\n")
    assert main(["--dry-run", "--sweep", str(sweep), "--output", str(tmp_path / "o")]) == 2
    assert "list them under grid: (train.seed: [0, 1, 2])" in capsys.readouterr().err


def test_a_task_runs_no_more_threads_than_the_cores_it_may_use(monkeypatch):
    from advcl_dist.launch.job import task_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))  # this 2-core machine
    assert task_threads(10, "debug", 1) == 2 and task_threads(10, "local", 2) == 1 and task_threads(10, "local", 4) == 1
    assert task_threads(10, "slurm", 1) == 2  # SLURM bound the task to 2 CPUs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert task_threads(10, "slurm", 8) == 10 and task_threads(4, "local", 2) == 4 and task_threads(10, "local", 2) == 8
