"""A method defined outside the package, with only the public plug-in API (tests/plugins/toy_method.py),
trains through tools/pretrain.py and through the pipeline; its config section is typed and validated."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advcl_dist.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "train.plugins=[tests/plugins/toy_method.py]"
TINY = ["data.name=digits", "data.workers=0", "train.device=cpu", "model.width=4", "model.proj_dim=16",
        "train.batch_size=256", "train.epochs=2", "optim.warmup_epochs=0", "train.log_every=1"]

pytestmark = pytest.mark.integration


def run_tool(tool: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{tool}.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": "/tmp"})


def test_the_plugins_section_is_typed_and_validated():
    cfg = load_config(None, [PLUGIN, "train.method=toy", "toy.scale=0.5"])
    assert cfg.toy.scale == 0.5 and cfg.toy.head_lr == 0.05
    with pytest.raises(ConfigError, match="toy.scale"):
        load_config(None, [PLUGIN, "train.method=toy", "toy.scale=-1"])
    with pytest.raises(ConfigError, match="toy.bogus"):
        load_config(None, [PLUGIN, "toy.bogus=1"])
    with pytest.raises(ConfigError, match="train.plugins"):
        load_config(None, ["train.plugins=[tests/plugins/missing.py]"])


def test_a_plugin_method_trains_through_tools_pretrain_with_its_hooks_and_groups(tmp_path):
    out = tmp_path / "toy"
    proc = run_tool("pretrain", PLUGIN, "train.method=toy", "toy.scale=0.5", f"out_dir={out}", *TINY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))  # 5 steps/epoch × 2 epochs
    assert [r["epochs_started"] for r in records] == [1.0] * 5 + [2.0] * 5  # on_epoch_start ran each epoch
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["finished"] and state["method"] == "toy" and state["objective"] == {"epochs_started": 2}
    # the schedule scales every group: the cosine ends at optim.min_lr / optim.lr of each base lr
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([5e-4, 0.05 * 5e-4 / 0.5])
    assert "scale: 0.5" in (out / "config.yaml").read_text()  # the section is saved with the run


def test_a_plugin_method_runs_through_the_pipeline_to_results(tmp_path):
    proc = run_tool("pipeline", PLUGIN, "train.method=toy", "pipeline.baselines=[]", f"out_dir={tmp_path}", *TINY,
                    "finetune.epochs=1", "finetune.batch_size=256", "attack.eval_steps=1", "eval.autoattack=false",
                    "eval.batch_size=360")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 stages" in proc.stdout  # toy needs no pseudo-labels: no f_pre, no clustering
    result = json.loads((tmp_path / "toy-slf" / "results.json").read_text())
    assert result["method"] == "toy" and result["finetune"] == "slf" and result["n_test"] == 360
