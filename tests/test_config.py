from pathlib import Path

import pytest
import yaml

from advcl_dist.config import ConfigError, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_authors_cifar10_settings():
    cfg = load_config()
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.steps == 5
    assert cfg.loss.temperature == 0.5 and cfg.advcl.pseudo_weight == 0.2
    assert cfg.optim.lr == 0.5 and cfg.train.batch_size == 512 and cfg.train.epochs == 1000
    assert cfg.pseudo.ks == [2, 10, 50, 100, 500]
    assert (cfg.attack.supervised_steps, cfg.attack.eval_steps) == (10, 20)
    f = cfg.finetune
    assert (f.mode, f.bn_branch, f.epochs, f.batch_size, f.momentum, f.weight_decay, f.milestones, f.gamma,
            f.trades_beta) == ("slf", "pgd", 25, 512, 0.9, 2e-4, [15, 20], 0.1, 6.0)
    assert cfg.out_dir == "runs/advcl-cifar10"  # interpolation resolved


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_loads(preset):
    load_config(ROOT / "configs" / preset)


def test_preset_then_overrides(tmp_path):
    cfg = load_config(ROOT / "configs" / "cifar10_advcl.yaml", ["train.epochs=30", "attack.steps=2",
                                                                 "pseudo.ks=[3,4]", "data.root=null"])
    assert (cfg.train.epochs, cfg.attack.steps, cfg.pseudo.ks, cfg.data.root) == (30, 2, [3, 4], None)


def test_unknown_key_names_the_key_and_the_valid_ones():
    expected = r"unknown config key 'train.lrr' in override.*valid keys under 'train'.*epochs"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["train.lrr=0.1"])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"'optim.learning_rate' in config file {bad}"):
        load_config(bad)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])


@pytest.mark.parametrize("override,key", [("train.method=byol", "train.method"), ("data.name=mnist", "data.name"),
                                          ("train.batch_size=0", "train.batch_size"),
                                          ("train.amp=fp8", "train.amp"), ("pseudo.ks=[1,10]", "pseudo.ks"),
                                          ("pseudo.labels=/nope.npy", "pseudo.labels"),
                                          ("optim.warmup_epochs=2000", "optim.warmup_epochs"),
                                          ("finetune.mode=full", "finetune.mode"),
                                          ("finetune.dataset=mnist", "finetune.dataset"),
                                          ("finetune.val_fraction=1", "finetune.val_fraction"),
                                          ("eval.aa_n=0", "eval.aa_n"),
                                          ("eval.aa_subset=random", "eval.aa_subset"),
                                          ("eval.aa_indices=/nope.txt", "eval.aa_indices"),
                                          ("pipeline.finetune=[slf,lp]", "pipeline.finetune"),
                                          ("pipeline.baselines=[byol]", "pipeline.baselines")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_override_without_equals_and_missing_file_are_clear():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_resolved_yaml_round_trips():
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.seed=7"])
    again = yaml.safe_load(to_yaml(cfg))
    assert again["train"]["seed"] == 7 and "${" not in to_yaml(cfg)


def test_a_key_that_moved_into_a_methods_section_names_its_new_place():
    with pytest.raises(ConfigError, match="'loss.pseudo_weight' in override .* is now 'advcl.pseudo_weight'"):
        load_config(None, ["loss.pseudo_weight=0.3"])


def test_a_config_pickles_as_its_yaml_with_the_method_sections():
    """submitit sends configs to the nodes pickled; the rebuilt one has the same values and sections."""
    import pickle

    cfg = load_config("configs/demo.yaml", ["advcl.pseudo_weight=0.3", "train.epochs=7"])
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and again.advcl.pseudo_weight == 0.3 and to_yaml(again) == to_yaml(cfg)
