"""Kill anywhere, rerun the same command, get the uninterrupted result (advcl_dist/faults.py names the points).

Each case SIGKILLs a stage's real process at one point (`ADVCL_FAULT`), runs the same command again, and
compares the folder with an uninterrupted run of that command: bit-equal weights (CPU), the same
pseudo-labels, results.json and per-image flags, every step once in metrics.jsonl, no temporary files, and
run.json listing the resume. Then: one of two gloo ranks killed (the survivor names it and stops, the rerun
resumes to the two-rank run's weights), and a full disk during a checkpoint write (one line naming the file,
the previous checkpoint intact).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from warm_tools import WarmTools

from advcl_dist.faults import ENV, POINTS, RANK_ENV

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300
# 16 px views: every stage 4x cheaper than at the digits' 32 px, the code paths the same
COMMON = ["data.name=digits", "data.workers=0", "model.width=4", "model.proj_dim=16", "views.size=16",
          "train.device=cpu"]
# 1437 digits // 256: 5 steps per epoch, 10 in all; checkpoints at steps 3, 5, 6, 9, 10.
PRETRAIN = [*COMMON, "train.method=advcl", "train.epochs=2", "train.batch_size=256", "optim.warmup_epochs=0",
            "attack.steps=1", "train.ckpt_every=3", "train.log_every=1"]
CLUSTER = [*COMMON, "pseudo.ks=[2,10]", "pseudo.iters=5", "eval.batch_size=500"]
# 360 test digits: PGD in 4 blocks of 100, AutoAttack on the first 40 (1 block). At ε = 0.25 APGD-CE breaks every
# image of the tiny classifier, so AutoAttack's other three attacks (seconds on an image that resists) have none;
# SLF's lr of 0.001 keeps its logits small enough for that (at the default 0.01 the loss grows to ~180, APGD-CE's
# gradient vanishes and APGD-T takes 10x longer).
EVAL = ["attack.eps=0.25", "attack.step_size=0.1", "attack.eval_steps=1", "eval.batch_size=100",
        "eval.autoattack=true", "eval.aa_n=40"]
SLF = [*COMMON, "finetune.mode=slf", "finetune.epochs=2", "finetune.batch_size=256", "finetune.lr=0.001",
       "train.log_every=1", *EVAL]
AFF = [*SLF[:-len(EVAL)], "finetune.mode=aff", "attack.supervised_steps=1", "train.ckpt_every=2",
       "eval.autoattack=false", "attack.eval_steps=1", "eval.batch_size=360"]  # checkpoints at 2, 4, 5, 6, ...
PIPELINE = [*COMMON, "train.batch_size=256", "train.epochs=1", "optim.warmup_epochs=0", "attack.steps=1",
            "pseudo.ks=[2,10]", "pseudo.iters=5", "finetune.epochs=1", "finetune.batch_size=256",
            "attack.eval_steps=1", "eval.autoattack=false", "eval.batch_size=360", "pipeline.finetune=[slf]",
            "pipeline.baselines=[]", "pipeline.figures=false", "pipeline.tsne_n=0"]
TOOLS = {"pretrain": "pretrain", "cluster": "cluster", "slf": "finetune", "aff": "finetune",
         "evaluate": "evaluate", "pipeline": "pipeline"}


def env(**extra: str) -> dict[str, str]:
    launch = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", ENV, RANK_ENV}
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launch}
    return {**base, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def warm():
    """Every run below is its own process, forked from one that has imported torch (tests/warm_tools.py)."""
    server = WarmTools(env())
    yield server
    server.close()


def run_tool(warm: WarmTools, tool: str, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    code, out, err = warm.run(tool, args, env(**({ENV: fault} if fault else {})), TIMEOUT)
    return subprocess.CompletedProcess([f"tools/{tool}.py", *args], code, out, err)


def run_cold(tool: str, args: list[str], **popen) -> subprocess.CompletedProcess:
    """A tool started from a fresh interpreter, for what a fork cannot set up (resource limits)."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=TIMEOUT, **popen)


def stage_args(stage: str, out: Path, refs: dict[str, Path]) -> list[str]:
    return {"pretrain": lambda: [f"out_dir={out}", *PRETRAIN],
            "cluster": lambda: [f"out_dir={out}", *CLUSTER, f"pseudo.fpre={refs['pretrain'] / 'checkpoint.pt'}"],
            "slf": lambda: [f"out_dir={out}", *SLF, f"finetune.checkpoint={refs['pretrain'] / 'checkpoint.pt'}"],
            "aff": lambda: [f"out_dir={out}", *AFF, f"finetune.checkpoint={refs['pretrain'] / 'checkpoint.pt'}"],
            "evaluate": lambda: [f"out_dir={out}", *COMMON, *EVAL,
                                 f"eval.checkpoint={refs['slf'] / 'classifier.pt'}"],
            "pipeline": lambda: [f"out_dir={out}", *PIPELINE]}[stage]()


@pytest.fixture(scope="module")
def refs(tmp_path_factory, warm) -> dict[str, Path]:
    """Every stage run once, uninterrupted (later stages read the pretraining and SLF outputs)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    folders: dict[str, Path] = {}
    for stage in ("pretrain", "cluster", "slf", "aff", "evaluate", "pipeline"):
        folders[stage] = root / stage
        done = run_tool(warm, TOOLS[stage], stage_args(stage, folders[stage], folders))
        assert done.returncode == 0, done.stderr
    return folders


# -- what "the same final state" means, per stage -----------------------------------------------------------
def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_checkpoint(got: Path, want: Path) -> None:
    a, b = weights(got), weights(want)
    assert a["step"] == b["step"] and a["finished"] and b["finished"]
    differ = [k for k in b["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"weights differ from the uninterrupted run's: {differ[:5]}"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def metric_records(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s")} for line in lines]


def assert_same_metrics(got: Path, want: Path) -> None:
    a, b = metric_records(got), metric_records(want)
    assert [r["step"] for r in a] == [r["step"] for r in b], "every step exactly once, in order"
    assert a == b


def results(folder: Path) -> dict:
    drop = ("seconds", "checkpoint", "pretrained")  # the time taken, and paths into each run's own folder
    return {k: v for k, v in json.loads((folder / "results.json").read_text()).items() if k not in drop}


def assert_same_evaluation(got: Path, want: Path) -> None:
    assert results(got) == results(want)
    with np.load(got / "flags.npz") as a, np.load(want / "flags.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in b.files)


def assert_same_clustering(got: Path, want: Path) -> None:
    assert np.array_equal(np.load(got / "pseudo_labels.npy"), np.load(want / "pseudo_labels.npy"))
    with np.load(got / "centroids.npz") as a, np.load(want / "centroids.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in b.files)


def assert_same_pipeline(got: Path, want: Path) -> None:
    assert_same_checkpoint(got / "advcl" / "checkpoint.pt", want / "advcl" / "checkpoint.pt")
    assert_same_clustering(got / "cluster", want / "cluster")
    for stage in ("simclr", "advcl", "advcl-slf"):
        assert_same_metrics(got / stage, want / stage)
    assert_same_evaluation(got / "advcl-slf", want / "advcl-slf")
    status = json.loads((got / "pipeline.json").read_text())
    assert {entry["status"] for entry in status.values()} == {"done"}
    assert (got / "summary.md").read_text().count("\n") == (want / "summary.md").read_text().count("\n")


COMPARE = {
    "pretrain": lambda got, want: (assert_same_checkpoint(got / "checkpoint.pt", want / "checkpoint.pt"),
                                   assert_same_metrics(got, want)),
    "cluster": assert_same_clustering,
    "slf": lambda got, want: (assert_same_checkpoint(got / "classifier.pt", want / "classifier.pt"),
                              assert_same_metrics(got, want), assert_same_evaluation(got, want)),
    "aff": lambda got, want: (assert_same_checkpoint(got / "classifier.pt", want / "classifier.pt"),
                              assert_same_metrics(got, want), assert_same_evaluation(got, want)),
    "evaluate": assert_same_evaluation,
    "pipeline": assert_same_pipeline,
}


@dataclass(frozen=True)
class Kill:
    stage: str
    fault: str  # ADVCL_FAULT: point[:file][@n]

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.fault}"


MATRIX = [
    Kill("pretrain", "train.mid_step@4"),  # between checkpoints 3 and 5
    Kill("pretrain", "train.before_checkpoint@2"),  # step 5, the end of epoch 1
    Kill("pretrain", "write.before_rename:checkpoint.pt@3"),  # step 6's checkpoint
    Kill("pretrain", "write.before_rename:run.json@1"),  # the first start's bookkeeping
    Kill("pretrain", "stage.before_finished"),
    Kill("cluster", "cluster.after_features"),
    Kill("cluster", "cluster.between_k@1"),
    Kill("cluster", "write.before_rename:pseudo_labels.npy"),
    Kill("cluster", "stage.before_finished"),
    Kill("slf", "train.mid_step@7"),
    Kill("slf", "write.before_rename:classifier.pt@2"),
    Kill("slf", "evaluate.between_blocks@2"),  # within the PGD blocks
    Kill("slf", "evaluate.before_results"),
    Kill("slf", "write.before_rename:results.json"),
    Kill("aff", "train.mid_step@3"),
    Kill("aff", "train.before_checkpoint@2"),  # step 4
    Kill("evaluate", "evaluate.between_blocks@4"),  # the last PGD block
    Kill("evaluate", "evaluate.between_blocks@5"),  # the AutoAttack block
    Kill("evaluate", "write.before_rename:flags.npz"),
    Kill("evaluate", "stage.before_finished"),
    Kill("pipeline", "pipeline.between_stages@2"),  # the clustering stage just finished
    Kill("pipeline", "train.mid_step@8"),  # AdvCL's step 3 (f_pre's 5 SimCLR steps come first)
    Kill("pipeline", "write.before_rename:summary.json"),
]


def test_the_matrix_covers_every_stage_and_point():
    points = {k.fault.split("@")[0].split(":")[0] for k in MATRIX}
    assert len(MATRIX) >= 20 and {k.stage for k in MATRIX} == set(TOOLS)
    # launch.requeue is killed inside a real SLURM job: tests/test_launch_slurm.py
    assert set(POINTS) - points == {"launch.requeue"}


@pytest.mark.parametrize("kill", MATRIX, ids=lambda k: k.id)
def test_killed_then_rerun_equals_uninterrupted(kill, refs, warm, tmp_path):
    out = tmp_path / "run"
    args = stage_args(kill.stage, out, refs)
    killed = run_tool(warm, TOOLS[kill.stage], args, fault=kill.fault)
    assert killed.returncode == -9, f"{kill.fault} was not reached (exit {killed.returncode}):\n{killed.stderr}"
    # a training stage killed with an unfinished checkpoint resumes from it (one killed in its evaluation does not)
    resumes = kill.stage in ("pretrain", "slf", "aff") and any(
        not weights(p)["finished"] for p in [*out.glob("checkpoint.pt"), *out.glob("classifier.pt")])
    again = run_tool(warm, TOOLS[kill.stage], args)
    assert again.returncode == 0, again.stderr
    COMPARE[kill.stage](out, refs[kill.stage])
    assert not list(out.rglob("*.tmp")), "a killed writer's temporary file was left behind"
    if resumes:
        assert json.loads((out / "run.json").read_text()).get("resumes"), "run.json does not list the resume"


# -- one of two ranks killed ---------------------------------------------------------------------------------
def two_ranks(out: Path, fault: str | None, job: str) -> list[subprocess.Popen]:
    """Two tasks as `srun --ntasks 2` starts them (tests/test_distributed.py); rank 1 dies at `fault`."""
    extra = {ENV: fault, RANK_ENV: "1"} if fault else {}
    return [subprocess.Popen([sys.executable, str(ROOT / "tools" / "pretrain.py"), f"out_dir={out}", *PRETRAIN],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(SLURM_JOB_ID=job, SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                                     SLURM_LOCALID=str(rank), SLURM_STEP_ID="0", SLURM_JOB_NODELIST="localhost",
                                     SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", **extra))
            for rank in (0, 1)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=TIMEOUT), p.communicate()[1]) for p in procs]


@pytest.mark.distributed
def test_a_killed_rank_is_named_by_the_survivor_and_the_rerun_resumes(tmp_path):
    job = 41000 + os.getpid() % 9000
    reference = tmp_path / "uninterrupted"
    assert [code for code, _ in finish(two_ranks(reference, None, str(job)))] == [0, 0]
    out = tmp_path / "run"
    start = time.monotonic()
    (code0, err0), (code1, _) = finish(two_ranks(out, "train.mid_step@7", str(job + 1)))
    assert code1 == -9 and code0 == 1, err0
    assert time.monotonic() - start < 120
    last = err0.strip().splitlines()[-1]
    assert last.startswith("error: [rank 0] rank 1 of 2 stopped responding") and "Traceback" not in err0, err0
    assert [code for code, _ in finish(two_ranks(out, None, str(job + 2)))] == [0, 0]
    assert_same_checkpoint(out / "checkpoint.pt", reference / "checkpoint.pt")
    assert_same_metrics(out, reference)
    assert json.loads((out / "run.json").read_text())["resumes"][0]["step"] == 6


# -- a full disk -----------------------------------------------------------------------------------------
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, refs, warm):
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG, as ENOSPC would) of the next checkpoint."""
    out = tmp_path / "run"
    first = run_tool(warm, "pretrain", [f"out_dir={out}", *PRETRAIN], fault="train.mid_step@4")
    assert first.returncode == -9, first.stderr
    kept = (out / "checkpoint.pt").read_bytes()  # step 3's; the next is written at step 5
    limit = len(kept) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = run_cold("pretrain", [f"out_dir={out}", *PRETRAIN], preexec_fn=small_files)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out / 'checkpoint.pt'}: File too large; the previous "
                           "checkpoint.pt is unchanged"), last
    assert (out / "checkpoint.pt").read_bytes() == kept
    assert not list(out.rglob("*.tmp"))
    again = run_tool(warm, "pretrain", [f"out_dir={out}", *PRETRAIN])
    assert again.returncode == 0, again.stderr
    assert_same_checkpoint(out / "checkpoint.pt", refs["pretrain"] / "checkpoint.pt")


def test_an_unwritable_out_dir_stops_with_one_line_and_keeps_what_is_there(tmp_path, warm):
    """The folder made read-only: the resumed run stops at its first write, naming the file, changing nothing.

    Root writes anywhere, so as root the rerun runs without the capabilities that let it (setpriv, util-linux)."""
    out = tmp_path / "run"
    first = run_tool(warm, "pretrain", [f"out_dir={out}", *PRETRAIN], fault="train.mid_step@4")
    assert first.returncode == -9, first.stderr

    def files():  # the lock file records its latest holder: not an output
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    out.chmod(0o555)
    try:
        command = [sys.executable, str(ROOT / "tools" / "pretrain.py"), f"out_dir={out}", *PRETRAIN]
        if os.geteuid() == 0:
            command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
        refused = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        out.chmod(0o755)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out / 'config.yaml'}: Permission denied; the previous config.yaml "
                           "is unchanged"), last
    assert files() == before

