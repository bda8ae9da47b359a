"""Finetuning and evaluation interrupted as a cluster interrupts them, as real processes of the tools.

- SIGUSR2 (SLURM's time-limit warning, `SLURM_JOB_ID` set) stops AFF finetuning at a step boundary mid-epoch
  with its checkpoint written; SIGKILL loses the steps since the last periodic checkpoint. Either way the rerun
  of the same command ends with exactly the classifier of an uninterrupted run (the randomness of every step
  is reseeded from (seed, step)), and metrics.jsonl has each step once.
- An evaluation killed between its attacks, or stopped by SIGUSR2 after its current block, resumes from its
  block cache without re-running finished blocks and writes the results of an uninterrupted evaluation.
- The cache is never trusted blindly: an unreadable block is recomputed, and another classifier's cache is
  refused without touching it.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from advcl_dist.config import load_config
from advcl_dist.engine import Trainer
from advcl_dist.finetune import finetune

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data.name=digits", "data.workers=0", "model.width=4", "train.device=cpu"]
# 1437 digits // 256 = 5 steps per epoch, 10 in all; log every step, evaluate cheaply (no AutoAttack).
AFF = ["finetune.mode=aff", "finetune.epochs=2", "finetune.batch_size=256", "attack.supervised_steps=2",
       "train.log_every=1", "eval.autoattack=false", "attack.eval_steps=1", "eval.batch_size=360"]
AFF_STEPS = 10
# 360 test digits in 18 PGD blocks of 20; AutoAttack on the first 40 (2 blocks).
EVAL = ["eval.autoattack=true", "eval.aa_n=40", "eval.batch_size=20", "attack.eval_steps=2"]
PGD, PGD_BLOCKS, AA, AA_BLOCKS = "pgd2", 18, "autoattack", 2
TIMEOUT = 300


# -- helpers ---------------------------------------------------------------------------------------
def stage_env(slurm: bool = False) -> dict[str, str]:
    """One process, one OpenMP thread; `slurm`: a plain `python` inside a SLURM job (SIGUSR2 = stop request).

    Every SLURM_* / torchrun variable of the caller is dropped, so the stage never believes it is one task of
    a multi-task launch (distributed.launch_env).
    """
    launch = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launch}
    env["OMP_NUM_THREADS"] = "1"
    if slurm:
        env["SLURM_JOB_ID"] = "1"
    return env


def command(tool: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args]


def run_tool(tool: str, *args: str, slurm: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(command(tool, *args), cwd=ROOT, env=stage_env(slurm), capture_output=True, text=True,
                          timeout=TIMEOUT)


class Started:
    """A tool running in the background, its stdout and stderr in one log file."""

    def __init__(self, tool: str, *args: str, log: Path, slurm: bool = False):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(command(tool, *args), cwd=ROOT, env=stage_env(slurm), stdout=f,
                                         stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the process ended (code {self.proc.returncode}) before {what}; make it slower "
                            f"(more attack steps), not the test sleepier:\n{self.output()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {what} within {TIMEOUT} s:\n{self.output()}")
            time.sleep(0.02)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def logged_steps(out: Path) -> list[int]:
    """Steps in metrics.jsonl, in file order (a line being written is left out)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    differ = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not differ, f"weights differ from the uninterrupted run's: {differ}"


def without_seconds(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "seconds"}


def block_files(out: Path, attack: str) -> list[Path]:
    return sorted((out / "eval_cache" / attack).glob("*.npy"))


def file_states(paths) -> dict[Path, tuple[int, int, bytes]]:
    """inode, mtime and bytes of each file: a file rewritten (even atomically, with equal bytes) shows."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


def cached_line(attack: str, images: int, blocks: int, cached: int) -> str:
    return (f"[evaluate] {attack}: {images} images in {blocks} blocks of ≤ 20 over 1 rank(s); "
            f"{cached} blocks cached, {blocks - cached} to run")


@contextlib.contextmanager
def one_thread():
    """In-process stages on one thread, like the tools' processes: on a small shared machine two intra-op
    threads can make a tiny model several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """40 small steps of AdvCL at a low learning rate: its BN statistics are settled, so the features (and the
    classifiers finetuned on them) depend on the input, and AutoAttack breaks them in one APGD-CE run."""
    out = tmp_path_factory.mktemp("advcl")
    with one_thread():
        Trainer(load_config(None, [f"out_dir={out}", *COMMON, "model.proj_dim=16", "train.batch_size=16",
                                   "train.epochs=1", "optim.lr=0.001", "optim.warmup_epochs=0", "attack.steps=1",
                                   "train.log_every=1000"])).fit(stop_after_steps=40)
    return out / "checkpoint.pt"


def aff_args(out: Path, pretrained: Path, *extra: str) -> list[str]:
    return [f"out_dir={out}", *COMMON, f"finetune.checkpoint={pretrained}", *AFF, *extra]


@pytest.fixture(scope="module")
def aff_reference(tmp_path_factory, pretrained) -> dict:
    """The classifier weights of an uninterrupted AFF run, made the way the interrupted ones are (a process of
    tools/finetune.py with one thread), so that they can be compared bit for bit."""
    out = tmp_path_factory.mktemp("aff-reference")
    done = run_tool("finetune", *aff_args(out, pretrained, "train.ckpt_every=100"))
    assert done.returncode == 0, done.stdout + done.stderr
    state = checkpoint(out / "classifier.pt")
    assert state["finished"] and state["step"] == AFF_STEPS
    assert logged_steps(out) == list(range(1, AFF_STEPS + 1))
    return state["model"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, pretrained) -> Path:
    """A finished SLF classifier (1 epoch), not evaluated."""
    out = tmp_path_factory.mktemp("slf")
    with one_thread():
        return finetune(load_config(None, [f"out_dir={out}", *COMMON, f"finetune.checkpoint={pretrained}",
                                           "finetune.mode=slf", "finetune.epochs=1", "finetune.batch_size=256"]),
                        evaluate_after=False)


def eval_args(out: Path, classifier: Path) -> list[str]:
    return [f"out_dir={out}", *COMMON, f"eval.checkpoint={classifier}", *EVAL]


@pytest.fixture(scope="module")
def clean_eval(tmp_path_factory, classifier) -> Path:
    """An uninterrupted evaluation of `classifier`: its out_dir (results.json, flags.npz, eval_cache)."""
    out = tmp_path_factory.mktemp("clean-eval")
    done = run_tool("evaluate", *eval_args(out, classifier))
    assert done.returncode == 0, done.stdout + done.stderr
    assert cached_line(PGD, 360, PGD_BLOCKS, 0) in done.stdout and cached_line(AA, 40, AA_BLOCKS, 0) in done.stdout
    assert len(block_files(out, PGD)) == PGD_BLOCKS and len(block_files(out, AA)) == AA_BLOCKS
    return out


def assert_same_results(out: Path, clean: Path) -> None:
    assert without_seconds(read_json(out / "results.json")) == without_seconds(read_json(clean / "results.json"))
    with np.load(out / "flags.npz") as got, np.load(clean / "flags.npz") as want:
        assert got.files == want.files
        for name in want.files:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# -- finetuning ------------------------------------------------------------------------------------
def test_sigusr2_stops_finetuning_mid_epoch_and_the_rerun_ends_with_the_uninterrupted_classifier(
        tmp_path, pretrained, aff_reference):
    out = tmp_path / "aff"
    args = aff_args(out, pretrained, "train.ckpt_every=100")
    first = Started("finetune", *args, log=tmp_path / "first.log", slurm=True)
    first.wait_until(lambda: max(logged_steps(out), default=0) >= 2, "step 2 in metrics.jsonl")
    first.proc.send_signal(signal.SIGUSR2)
    assert first.wait() == 0, first.output()

    state = checkpoint(out / "classifier.pt")
    stopped = state["step"]
    assert 2 <= stopped < AFF_STEPS and stopped % 5 != 0, (
        f"stopped at step {stopped}, not mid-epoch: the signal came too late; raise attack.supervised_steps")
    assert not state["finished"]
    assert f"[finetune] stopped at step {stopped} of {AFF_STEPS} on SIGUSR2" in first.output()
    run = read_json(out / "run.json")
    assert run["stopped_by_signal"] is True and run["finished"] is False and run["steps_done"] == stopped
    assert not (out / "results.json").exists()  # a stopped finetuning run does not evaluate
    assert logged_steps(out) == list(range(1, stopped + 1))

    rerun = run_tool("finetune", *args, slurm=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed at step {stopped}" in rerun.stdout
    final = checkpoint(out / "classifier.pt")
    assert final["finished"] and final["step"] == AFF_STEPS
    assert_same_weights(final["model"], aff_reference)
    assert logged_steps(out) == list(range(1, AFF_STEPS + 1))  # each step once
    run = read_json(out / "run.json")
    assert run["finished"] is True and "stopped_by_signal" not in run
    assert [r["step"] for r in run["resumes"]] == [stopped]
    assert (out / "results.json").is_file()


def test_sigkill_after_a_checkpoint_resumes_to_the_uninterrupted_classifier(tmp_path, pretrained, aff_reference):
    out = tmp_path / "aff"
    args = aff_args(out, pretrained, "train.ckpt_every=3")
    first = Started("finetune", *args, log=tmp_path / "first.log")
    first.wait_until(lambda: max(logged_steps(out), default=0) >= 4 and (out / "run.json").is_file()
                     and (out / "classifier.pt").is_file(), "step 4 in metrics.jsonl after a checkpoint")
    first.proc.kill()
    assert first.wait() == -signal.SIGKILL

    state = checkpoint(out / "classifier.pt")
    saved = state["step"]
    assert 3 <= saved < AFF_STEPS and not state["finished"], f"killed too late (checkpoint of step {saved})"
    assert saved % 3 == 0 or saved % 5 == 0  # every ckpt_every steps and at the end of each epoch
    assert read_json(out / "run.json")["finished"] is False

    rerun = run_tool("finetune", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed at step {saved}" in rerun.stdout
    final = checkpoint(out / "classifier.pt")
    assert final["finished"] and final["step"] == AFF_STEPS
    assert_same_weights(final["model"], aff_reference)
    # the lines logged after the checkpoint by the killed process were dropped and written again once
    assert logged_steps(out) == list(range(1, AFF_STEPS + 1))
    run = read_json(out / "run.json")
    assert run["finished"] is True and [r["step"] for r in run["resumes"]] == [saved]


# -- evaluation ------------------------------------------------------------------------------------
def test_evaluation_killed_between_attacks_reruns_no_finished_block(tmp_path, classifier, clean_eval):
    out = tmp_path / "eval"
    args = eval_args(out, classifier)
    first = Started("evaluate", *args, log=tmp_path / "first.log")
    first.wait_until(lambda: len(block_files(out, PGD)) == PGD_BLOCKS, f"all {PGD_BLOCKS} PGD blocks cached")
    first.proc.kill()
    assert first.wait() == -signal.SIGKILL
    if (out / "results.json").exists():
        pytest.fail("the evaluation finished before it could be killed; make AutoAttack slower (smaller attack.eps "
                    "or a larger eval.aa_n)")
    before = file_states(block_files(out, PGD) + block_files(out, AA))
    aa_done = len(block_files(out, AA))

    rerun = run_tool("evaluate", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert cached_line(PGD, 360, PGD_BLOCKS, PGD_BLOCKS) in rerun.stdout
    assert cached_line(AA, 40, AA_BLOCKS, aa_done) in rerun.stdout
    assert file_states(before) == before  # no finished block (PGD, or AutoAttack's) was computed again
    assert len(block_files(out, AA)) == AA_BLOCKS
    assert_same_results(out, clean_eval)
    assert read_json(out / "run.json")["finished"] is True


def test_sigusr2_stops_evaluation_after_its_current_block_and_the_rerun_finishes(tmp_path, classifier, clean_eval):
    """Requeued twice: stopped during PGD, then during AutoAttack's first block; the third run finishes."""
    out = tmp_path / "eval"
    args = eval_args(out, classifier)
    first = Started("evaluate", *args, log=tmp_path / "first.log", slurm=True)
    first.wait_until(lambda: len(block_files(out, PGD)) >= 2, "2 PGD blocks cached")
    at_signal = len(block_files(out, PGD))
    first.proc.send_signal(signal.SIGUSR2)
    assert first.wait() == 0, first.output()
    assert "[evaluate] stopped on the launcher's signal" in first.output()
    assert not (out / "results.json").exists()
    done = len(block_files(out, PGD))
    # the block running when the signal came is finished and cached (one more may have ended before it came)
    assert at_signal <= done <= at_signal + 2 and done < PGD_BLOCKS, (at_signal, done)
    assert not block_files(out, AA)
    run = read_json(out / "run.json")
    assert run["stopped_by_signal"] is True and run["finished"] is False
    before = file_states(block_files(out, PGD))

    second = Started("evaluate", *args, log=tmp_path / "second.log", slurm=True)
    # AutoAttack's own log lines come from inside its first block: a signal sent when the last PGD block is
    # cached but before that block starts would (rightly) stop the run with no AutoAttack block done.
    second.wait_until(lambda: "[evaluate] AA " in second.output(), "AutoAttack's first block started")
    assert len(block_files(out, PGD)) == PGD_BLOCKS
    second.proc.send_signal(signal.SIGUSR2)  # during AutoAttack's first block: it ends, the second never starts
    assert second.wait() == 0, second.output()
    assert cached_line(PGD, 360, PGD_BLOCKS, done) in second.output()
    assert "[evaluate] stopped on the launcher's signal" in second.output(), (
        "the signal came after AutoAttack's last block had started; make AutoAttack slower")
    assert not (out / "results.json").exists()
    assert [p.name for p in block_files(out, AA)] == ["0-20.npy"]
    assert file_states(before) == before
    before = file_states(block_files(out, PGD) + block_files(out, AA))

    rerun = run_tool("evaluate", *args, slurm=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert cached_line(PGD, 360, PGD_BLOCKS, PGD_BLOCKS) in rerun.stdout
    assert cached_line(AA, 40, AA_BLOCKS, 1) in rerun.stdout
    assert file_states(before) == before
    assert_same_results(out, clean_eval)
    run = read_json(out / "run.json")
    assert run["finished"] is True and "stopped_by_signal" not in run


def test_an_unreadable_cached_block_is_recomputed(tmp_path, classifier, clean_eval):
    out = tmp_path / "eval"
    shutil.copytree(clean_eval, out)
    (out / "results.json").unlink()
    broken = out / "eval_cache" / PGD / "100-120.npy"
    broken.write_bytes(b"\x00garbage, not an .npy file\xff" * 8)
    others = file_states([p for p in block_files(out, PGD) + block_files(out, AA) if p != broken])

    rerun = run_tool("evaluate", *eval_args(out, classifier))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"cache block {broken} is unreadable" in rerun.stdout
    assert cached_line(PGD, 360, PGD_BLOCKS, PGD_BLOCKS - 1) in rerun.stdout
    assert cached_line(AA, 40, AA_BLOCKS, AA_BLOCKS) in rerun.stdout
    assert file_states(others) == others
    np.testing.assert_array_equal(np.load(broken), np.load(clean_eval / "eval_cache" / PGD / "100-120.npy"))
    assert_same_results(out, clean_eval)


def refuse_another_classifier(tmp_path, classifier, clean_eval) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished evaluation folder, then an evaluation of a copy of its classifier (the same weights, another
    file) into it; returns the folder and the refused run."""
    out = tmp_path / "eval"
    shutil.copytree(clean_eval, out)
    other = tmp_path / "elsewhere" / "classifier.pt"
    other.parent.mkdir()
    shutil.copy2(classifier, other)
    return out, run_tool("evaluate", *eval_args(out, other))


def folder_bytes(out: Path, *names: str) -> dict[Path, bytes]:
    paths = [out / name for name in names] + sorted((out / "eval_cache").rglob("*"))
    return {p: p.read_bytes() for p in paths if p.is_file()}


def test_another_classifiers_cache_is_refused_and_left_untouched(tmp_path, classifier, clean_eval):
    before = folder_bytes(clean_eval, "results.json", "flags.npz")
    out, refused = refuse_another_classifier(tmp_path, classifier, clean_eval)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"{out / 'eval_cache'} holds evaluation results of another classifier" in errors[0]
    assert str((tmp_path / "elsewhere" / "classifier.pt").resolve()) in errors[0]
    after = folder_bytes(out, "results.json", "flags.npz")
    assert {p.relative_to(out): b for p, b in after.items()} == {p.relative_to(clean_eval): b
                                                                  for p, b in before.items()}


def test_a_refused_evaluation_leaves_the_run_record_of_the_finished_one_alone(tmp_path, classifier, clean_eval):
    out, refused = refuse_another_classifier(tmp_path, classifier, clean_eval)
    assert refused.returncode == 2
    assert (out / "config.yaml").read_bytes() == (clean_eval / "config.yaml").read_bytes()
    assert read_json(out / "run.json") == read_json(clean_eval / "run.json")
