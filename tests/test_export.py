"""tools/export.py: safetensors that rebuild the classifier exactly and load, as plain torchvision weights, into
a torchvision ResNet; one-line errors through the real CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advcl_dist.config import ConfigError, load_config
from advcl_dist.engine import Trainer
from advcl_dist.engine.checkpoint import load_encoder
from advcl_dist.evaluate import load_classifier
from advcl_dist.export import export_run, plain_encoder, plain_encoder_weights
from advcl_dist.finetune import finetune
from advcl_dist.models import BACKBONES

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.name=digits", "data.workers=0", "model.width=4", "model.proj_dim=16", "train.batch_size=64",
        "train.epochs=1", "optim.warmup_epochs=0", "attack.steps=1", "train.device=cpu"]
FT = ["finetune.mode=slf", "finetune.epochs=1", "finetune.batch_size=256", "attack.eval_steps=1",
      "eval.autoattack=false", "eval.batch_size=360"]


def export_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny AdvCL pretraining (normal + pgd BN branches), its SLF classifier, and the CLI's export of it."""
    root = tmp_path_factory.mktemp("export")
    Trainer(load_config(None, [f"out_dir={root / 'advcl'}", *TINY])).fit(2)  # 2 steps: branches already differ
    pretrained = root / "advcl" / "checkpoint.pt"
    finetune(load_config(None, [f"out_dir={root / 'slf'}", *TINY, *FT, f"finetune.checkpoint={pretrained}"]))
    done = export_cli(root / "slf")
    assert done.returncode == 0, done.stderr
    return root


def test_classifier_safetensors_gives_the_same_logits(runs):
    original = load_classifier(runs / "slf" / "classifier.pt")
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        expected = original(x)
        for path in (runs / "slf" / "export" / "classifier.safetensors", runs / "slf" / "export"):
            assert torch.equal(load_classifier(path)(x), expected)


def test_encoder_safetensors_loads_into_a_torchvision_resnet_with_the_served_branch(runs):
    facts = json.loads((runs / "slf" / "export" / "export.json").read_text())
    assert facts["model"]["served_branch"] == "pgd" and facts["encoder_keys"]["dropped_branches"] == ["normal"]
    assert facts["encoder_keys"]["unmapped"] == [] and facts["plain_network"]["blocks"] == [2, 2, 2, 2]
    assert facts["threat_model"]["eps"] == pytest.approx(8 / 255) and facts["input"]["range"] == [0, 1]
    assert facts["results"]["SA"] >= facts["results"]["RA"] and facts["source"]["finished"]
    net = plain_encoder(facts)
    net.load_state_dict(load_file(runs / "slf" / "export" / "encoder.safetensors"))  # strict: every key fits
    encoder, _ = load_encoder(runs / "advcl" / "checkpoint.pt")
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        plain = net(x)
        assert torch.equal(plain, encoder(x, (("pgd", 16),)))
        assert torch.equal(plain, load_classifier(runs / "slf" / "classifier.pt").features(x))
        assert not torch.allclose(plain, encoder(x, (("normal", 16),)))  # the branch choice matters


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_full_size_keys_are_exactly_torchvisions(arch):
    import torchvision

    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        ours = BACKBONES[arch](64, ("normal", "pgd", "pgd_ce")).state_dict()
        theirs = getattr(torchvision.models, arch)().state_dict()
    plain, unmapped = plain_encoder_weights(ours, ["normal", "pgd", "pgd_ce"], "pgd_ce")
    assert unmapped == [] and plain.keys() == {k for k in theirs if not k.startswith("fc.")}
    stem = {"conv1.weight"} if arch == "resnet18" else set()  # the CIFAR stem is 3×3
    assert all(plain[k].shape == theirs[k].shape for k in plain.keys() - stem)


def test_pretraining_encoder_alone_and_no_silent_overwrite(runs, tmp_path):
    written = export_run(runs / "advcl", tmp_path, encoder_only=True, branch="normal")
    facts = json.loads(written.read_text())
    assert facts["kind"] == "encoder" and not (tmp_path / "classifier.safetensors").exists()
    net = plain_encoder(facts)
    net.load_state_dict(load_file(tmp_path / "encoder.safetensors"))
    encoder, _ = load_encoder(runs / "advcl" / "checkpoint.pt")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), encoder(x, (("normal", 4),)))
    with pytest.raises(FileExistsError, match="--force"):
        export_run(runs / "advcl", tmp_path, encoder_only=True)
    with pytest.raises(ConfigError, match="encoder"):
        load_classifier(tmp_path)


def test_bad_inputs_exit_2_with_one_line(runs, tmp_path):
    cases = {"does not exist": tmp_path / "missing", "finetune it first": runs / "advcl",
             "not a run folder": runs / "advcl" / "checkpoint.pt"}  # refusing to overwrite: tested above
    for expected, run_dir in cases.items():
        done = export_cli(run_dir)
        assert done.returncode == 2 and done.stderr.startswith("error: "), (run_dir, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr
