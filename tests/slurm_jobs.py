"""The local SLURM cluster of the tests (two slurmd nodes on this machine, slurm/local/start.sh) and
tools/submit.py driven against it: the `slurm` fixture, submit, wait_for. Used by test_launch_slurm*.py,
which pytest-xdist runs side by side (the cluster has a CPU slot per core on each node)."""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# 33 steps on the demo data, with a narrow network: what is tested is the launch, not the model
PRETRAIN = ["train.epochs=3", "train.log_every=1", "train.ckpt_every=5", "model.width=4", "model.proj_dim=16"]
TINY = ["model.width=4", "model.proj_dim=16", "train.batch_size=256", "train.epochs=1", "optim.warmup_epochs=0",
        "attack.steps=1", "pseudo.ks=[2,10]", "finetune.epochs=1", "finetune.batch_size=256", "attack.eval_steps=1",
        "eval.autoattack=false", "eval.batch_size=120", "pipeline.finetune=[slf]", "pipeline.baselines=[simclr]",
        "pipeline.tsne_n=0", "eval.curves=false"]
NODES = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--timeout", "20"]


def ensure_cluster() -> None:
    """The local cluster, started through slurm/local/start.sh when it is not up (the `slurm` fixture)."""
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
        # one start for all test processes: the others wait here, then find the cluster up
        with open(Path(tempfile.gettempdir()) / "advcl-dist-slurm-start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not two_nodes_up():
                subprocess.run(["bash", str(ROOT / "slurm/local/start.sh"), "2"], check=True, timeout=180)
    assert two_nodes_up()


def submit(*argv: str, env: dict | None = None) -> dict:
    """Run tools/submit.py (`env`: variables added to its environment, which sbatch passes on to the job);
    returns the last submission of <output>/submit.json."""
    out = subprocess.run([sys.executable, "tools/submit.py", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env={**os.environ, **(env or {})})
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


