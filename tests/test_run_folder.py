"""What a run folder guarantees: one live run per folder, files the umask allows teammates to read, no leftovers of
a killed writer, and a metrics log that survives a crash mid-line."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from advcl_dist.config_schema import ConfigError
from advcl_dist.engine.metrics import truncate_jsonl
from advcl_dist.folder_lock import LOCK, acquire, release
from advcl_dist.run_folder import OutputError, atomic_write, write_text

HOLD = """
import sys, time
from advcl_dist.folder_lock import acquire
acquire(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


def hold_lock(folder):
    """Another process holding `folder`'s lock (as a live run does) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_live_folder_stops_naming_the_holder(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"out_dir {tmp_path} is in use by pid {holder.pid} on .*choose another"):
            acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing anything: its lock is taken over, and now names this process
    acquire(tmp_path)
    try:
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    finally:
        release(tmp_path)


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    """The pipeline's stages and finetuning's evaluation lock folders their caller already holds."""
    acquire(tmp_path)
    acquire(tmp_path)
    release(tmp_path)
    try:  # still held once: another process is refused, naming this one
        other = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path)], capture_output=True, text=True,
                               timeout=60)
        assert other.returncode != 0 and f"in use by pid {os.getpid()}" in other.stderr
    finally:
        release(tmp_path)


def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text("x", tmp_path / "shared.txt")
        os.umask(0o077)
        write_text("x", tmp_path / "private.txt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_taking_the_lock_removes_a_killed_writers_temporary_files(tmp_path):
    (tmp_path / "eval_cache").mkdir()
    stale = [tmp_path / ".checkpoint.pt.abc123.tmp", tmp_path / "eval_cache" / ".0-100.npy.x1.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    (tmp_path / "keep.tmp.json").write_text("{}")
    acquire(tmp_path)
    release(tmp_path)
    assert not any(p.exists() for p in stale) and (tmp_path / "keep.tmp.json").exists()


def test_a_failed_write_keeps_the_previous_file_and_names_it(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def fails(f):
        f.write(b"new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=rf"cannot write {target}: No space left on device; the previous "
                                          r"results.json is unchanged"):
        atomic_write(target, fails)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_half_written_last_metrics_line_is_dropped_and_a_damaged_one_is_named(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    truncate_jsonl(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert f"dropped the half-written last line of {log}" in capsys.readouterr().err
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=rf"{log} line 2 is not JSON"):
        truncate_jsonl(log, 3)


@pytest.mark.integration
def test_ctrl_c_checkpoints_at_the_next_step_and_exits_with_one_line(tmp_path):
    """SIGINT (Ctrl-C) mid-run: the step in flight finishes, its checkpoint is written, one line says so."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "tools/pretrain.py", f"out_dir={out}", "data.name=digits",
                             "data.workers=0", "model.width=4", "model.proj_dim=16", "views.size=16",
                             "train.device=cpu", "train.batch_size=64", "train.epochs=3", "optim.warmup_epochs=0",
                             "attack.steps=1", "train.log_every=1", "train.ckpt_every=1000"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or (out / "metrics.jsonl").read_text().count("\n") < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == ("stopped by Ctrl-C with the checkpoint written; run the same command "
                                               "again to resume")
    import torch

    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= step < 66 and f"stopped at step {step} of 66 on SIGINT (Ctrl-C)" in stdout
