"""tools/submit.py on the local SLURM cluster (tests/slurm_jobs.py): the chained pipeline with every stage
(finetuning and evaluation too) as a 2-node job, and a sweep as job arrays + tools/report.py."""
import json
import re
import subprocess
import sys

import pytest
from slurm_jobs import NODES, ROOT, TINY, submit, wait_for

pytestmark = pytest.mark.slurm


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
    assert re.search(r"\| advcl \| SLF \| digits \| \d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\) \|", lines[2])  # SA (Wilson)
    assert len(lines) == 6 and lines[5].startswith("(low–high) = Wilson 95 % interval")
    assert (tmp_path / "report.csv").is_file()


def test_a_mini_table1_sweep_runs_on_slurm_and_renders_in_the_papers_layout(slurm, tmp_path):
    """configs/sweeps/demo_table1.yaml: ACL and RoCL × SLF and ALF on digits, every stage a 2-node job (no
    AutoAttack: TINY); then tools/report.py --paper table1 puts our numbers beside the published ones."""
    sub = submit("--cluster", "slurm", *NODES, "--sweep", "configs/sweeps/demo_table1.yaml", "--output",
                 str(tmp_path), *TINY)
    jobs = {j["stage"]: j for j in sub["jobs"]}
    assert list(jobs) == ["acl", "rocl", "acl-slf", "acl-alf", "rocl-slf", "rocl-alf", "summary"]
    assert jobs["acl"]["dependency"] is None and jobs["rocl"]["dependency"] is None
    for name in ("acl", "rocl"):
        for mode in ("slf", "alf"):
            assert jobs[f"{name}-{mode}"]["dependency"] == f"afterok:{jobs[name]['job_ids'][0]}"
    wait_for([i for job in sub["jobs"] for i in job["job_ids"]])
    point = tmp_path / "00-name=digits"
    for name in ("acl", "rocl"):
        run = json.loads((point / name / "run.json").read_text())
        assert run["world_size"] == 2 and run["finished"] is True and run["method"] == name
        for mode in ("slf", "alf"):
            result = json.loads((point / f"{name}-{mode}" / "results.json").read_text())
            assert result["method"] == name and result["finetune"] == mode and 0 <= result["RA"] <= result["SA"]
    report = subprocess.run([sys.executable, "tools/report.py", str(tmp_path), "--paper", "table1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "report_table1.md").read_text()
    for name, label in (("acl", "ACL"), ("rocl", "RoCL")):  # the paper's row names
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        slf, alf = (json.loads((point / f"{name}-{mode}" / "results.json").read_text()) for mode in ("slf", "alf"))
        assert row == (f"| {label} | — | {slf['RA']:.2f} | {slf['SA']:.2f} | — | {alf['RA']:.2f} | {alf['SA']:.2f} |")
    assert (tmp_path / "report_table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
