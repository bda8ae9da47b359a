"""The pipeline runs every stage once: finished stages are skipped, a failed one runs again."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from advcl_dist import pipeline
from advcl_dist.config import ConfigError, load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]

TINY = ["data.name=digits", "data.workers=0", "model.width=4", "model.proj_dim=16", "train.batch_size=256",
        "train.epochs=1", "optim.warmup_epochs=0", "attack.steps=1", "pseudo.ks=[2,10]", "finetune.epochs=1",
        "finetune.batch_size=256", "attack.eval_steps=1", "eval.autoattack=false", "eval.batch_size=360",
        "pipeline.finetune=[slf]", "pipeline.baselines=[simclr]"]


# the gradient-masking curves on 20 images (Square with 20 queries) and the t-SNE of 50: the figures' inputs
CURVES = ["eval.curves=true", "eval.aa_n=20", "eval.square_queries=20", "pipeline.tsne_n=50"]


class Boom(RuntimeError):
    pass


def test_stages_and_their_order(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", *TINY, "pipeline.finetune=[slf,aff]",
                             "pipeline.baselines=[simclr,supervised_at]"])
    names = [s.name for s in pipeline.plan_stages(cfg)]
    assert names == ["simclr", "cluster", "advcl", "supervised_at", "advcl-slf", "advcl-aff", "simclr-slf",
                     "simclr-aff", "supervised_at-slf", "supervised_at-aff"]


def test_stages_follow_what_the_methods_declare_they_need(tmp_path):
    """No method that needs pseudo-labels: no f_pre and no clustering stage; f_pre is configurable."""
    cfg = load_config(None, [f"out_dir={tmp_path}", *TINY, "train.method=simclr",
                             "pipeline.baselines=[supervised_at]"])
    assert [s.name for s in pipeline.plan_stages(cfg)] == ["simclr", "supervised_at", "simclr-slf",
                                                            "supervised_at-slf"]
    cfg = load_config(None, [f"out_dir={tmp_path}", *TINY, "pipeline.baselines=[]",
                             "pipeline.fpre_method=supervised_at"])
    stages = pipeline.plan_stages(cfg)
    assert [s.name for s in stages] == ["supervised_at", "cluster", "advcl", "advcl-slf"]
    assert stages[1].values["pseudo.fpre"] == str(tmp_path / "supervised_at" / "checkpoint.pt")
    assert stages[2].needs == ("cluster",) and stages[1].needs == ("supervised_at",)


def test_variants_teachers_and_post_processing_are_planned_from_what_methods_declare(tmp_path):
    """A variant runs its method with its options under its own name; DeACL's teacher is the SimCLR run (the same
    stage as f_pre); DynACL++ clusters its own features and trains lpaff from its checkpoint, and its finetuning
    reads that checkpoint."""
    cfg = load_config(None, [f"out_dir={tmp_path}", *TINY, "pipeline.baselines=[deacl,dynacl++,acl_a2a]"])
    stages = {s.name: s for s in pipeline.plan_stages(cfg)}
    assert list(stages) == ["simclr", "cluster", "advcl", "deacl", "dynacl++", "dynacl++-cluster", "dynacl++-post",
                            "acl_a2a", "advcl-slf", "deacl-slf", "dynacl++-slf", "acl_a2a-slf"]
    simclr = str(tmp_path / "simclr" / "checkpoint.pt")
    assert stages["deacl"].values["deacl.teacher"] == simclr and stages["deacl"].needs == ("simclr",)
    assert stages["acl_a2a"].values == {"out_dir": str(tmp_path / "acl_a2a"), "pseudo.labels": None,
                                        "train.label": "acl_a2a", "train.method": "acl", "acl.variant": "a2a"}
    assert stages["dynacl++"].values["dynacl.post"] is True and stages["dynacl++"].needs == ()
    dyn = str(tmp_path / "dynacl++" / "checkpoint.pt")
    assert stages["dynacl++-cluster"].values["pseudo.fpre"] == dyn
    assert stages["dynacl++-cluster"].needs == ("dynacl++",)
    post = stages["dynacl++-post"].values
    assert post["train.method"] == "lpaff" and post["lpaff.init"] == dyn and post["train.label"] == "dynacl++"
    assert post["pseudo.labels"] == str(tmp_path / "dynacl++-cluster" / "pseudo_labels.npy")
    assert post["pseudo.ks"] == stages["dynacl++-cluster"].values["pseudo.ks"] == [10]
    assert stages["dynacl++-slf"].values["finetune.checkpoint"] == str(tmp_path / "dynacl++-post" / "checkpoint.pt")
    assert stages["dynacl++-slf"].needs == ("dynacl++-post",)


@pytest.mark.parametrize("overrides, match", [
    (["pipeline.baselines=[dynacl+++]"], r"'dynacl\+\+\+' is not a registered method .* or variant"),
    (["train.method=dynacl++"], r"is a variant, not a method: run it as train.method=dynacl dynacl.post=True"),
    (["train.method=simclr", "acl.variant=a2a"], r"'acl.variant': is an option of method acl, which this run "),
])
def test_unknown_methods_and_options_of_methods_not_run_are_refused(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"out_dir={tmp_path}", *TINY, *overrides])


def test_skips_finished_stages_and_reruns_a_failed_one(tmp_path, monkeypatch, capsys):
    cfg = load_config(None, [f"out_dir={tmp_path}", *TINY, *CURVES])
    real_finetune = pipeline.finetune

    def failing(stage_cfg, stop=None):
        if stage_cfg.out_dir.endswith("simclr-slf"):
            raise Boom("injected failure")
        return real_finetune(stage_cfg, stop=stop)

    monkeypatch.setattr(pipeline, "finetune", failing)
    with pytest.raises(Boom):
        pipeline.run_pipeline(cfg)
    status = json.loads((tmp_path / "pipeline.json").read_text())
    assert {k: v["status"] for k, v in status.items()} == {
        "simclr": "done", "cluster": "done", "advcl": "done", "advcl-slf": "done", "simclr-slf": "failed"}
    assert "injected failure" in status["simclr-slf"]["error"]
    labels = json.loads((tmp_path / "cluster" / "clusters.json").read_text())
    assert labels["n"] == 1437 and labels["ks"] == [2, 10]
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.suffix in (".pt", ".npy")}
    capsys.readouterr()

    monkeypatch.setattr(pipeline, "finetune", real_finetune)
    rows = pipeline.run_pipeline(cfg)
    out = capsys.readouterr().out
    for name in ("simclr", "cluster", "advcl", "advcl-slf"):
        assert f"[pipeline] {name}: already done" in out
    assert "[pipeline] simclr-slf: running" in out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing finished was redone
    assert [(r["method"], r["finetune"]) for r in rows] == [("advcl", "slf"), ("simclr", "slf")]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"] == rows
    table = (tmp_path / "summary.md").read_text()
    assert "| advcl | SLF | digits |" in table and "| simclr | SLF | digits |" in table
    # the curves' 20 images (those AutoAttack would get) are a class-stratified sample: the same for every method
    assert rows[0]["aa_subset"]["sha256"] == rows[1]["aa_subset"]["sha256"]
    for row in rows:  # the curves at ε = 0 and at the run's ε are the evaluation's flags on those images
        folder = tmp_path / f"{row['method']}-slf"
        curves, flags = row["curves"], np.load(folder / "flags.npz")
        chosen = flags["aa_index"]
        assert row["aa_subset"]["rule"] == "stratified" and row["aa_subset"]["classes"] == 10 and len(chosen) == 20
        assert curves["n"] == 20 and curves["SA"] == curves["ra_vs_eps"][0] == 100 * flags["clean"][chosen].mean()
        assert curves["ra_vs_eps"][3] == 100 * flags["robust"][chosen].mean()  # the grid's 8/255 is the run's ε
        assert row["aa_subset"]["AA"] is None and row["AA"] is None
        assert set(row["checks"]) == {"ra_non_increasing_in_eps", "ra_near_zero_at_largest_eps",
                                      "more_steps_do_not_raise_ra", "black_box_not_stronger"}  # no AA: no AA check
        assert imread(folder / "curves.png").shape[0] > 100
    for figure in ("summary", "curves", "tsne"):
        assert f"![{figure}]({figure}.png)" in table
        assert imread(tmp_path / f"{figure}.png").shape[0] > 100

    # tools/plot.py redraws a figure of any finished run: here the t-SNE of one pretraining run folder
    tsne = subprocess.run([sys.executable, "tools/plot.py", "tsne", str(tmp_path / "advcl"), "--n", "40"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert tsne.returncode == 0 and tsne.stdout.strip() == str(tmp_path / "advcl" / "tsne.png"), tsne.stderr
    assert imread(tmp_path / "advcl" / "tsne.png").shape[0] > 100

    pipeline.run_pipeline(cfg)
    assert "running" not in capsys.readouterr().out
    status = json.loads((tmp_path / "pipeline.json").read_text())
    assert all(v["status"] == "done" for v in status.values())
