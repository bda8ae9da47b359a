"""Typed run configuration: dataclass schema (OmegaConf structured), YAML presets, `key=value` overrides.

The schema's defaults are the AdvCL authors' CIFAR-10 settings (DESIGN §1); presets in
`configs/` override what differs. Every problem — an unknown key, a wrong type, a bad
value — is reported before any work starts, naming the key and where it came from.

Shared sections (data, model, attack threat model, optimiser, ...) are fixed in config_schema.py; every registered
method with settings of its own adds a section named after it (`advcl.pseudo_weight`), so the schema
is this dataclass extended by the registered methods (`schema()`). Methods outside the package are
imported from `train.plugins` (module names or .py files) before the schema is built.
A config pickles as its YAML (submitit sends configs to the nodes), rebuilt there the same way.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .config_schema import (  # noqa: F401  (re-exported: the sections are imported from here)
    AttackConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    LaunchConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PipelineConfig,
    PseudoConfig,
    TrainConfig,
    ViewsConfig,
)

FINETUNE_MODES = ("slf", "alf", "aff")
ENGINES = ("ddp", "deepspeed")
KMEANS_INITS = ("kmeans++", "random")
DATA_FORMATS = ("ffcv", "torchvision")
# Keys that moved into a method's own section: an old preset gets the new name in its error.
MOVED = {"loss.pseudo_weight": "advcl.pseudo_weight", "attack.fuse": "advcl.fuse_attacks",
         "views.hf_radius": "advcl.hf_radius"}
METHOD_SETTINGS: dict[str, type] = {}  # method name → its settings dataclass (filled by methods.register)
_SCHEMAS: dict[tuple, type] = {}


def schema() -> type:
    """`Config` extended by one section per registered method that has settings."""
    import dataclasses

    from . import methods  # noqa: F401  (registers the built-in methods)

    key = tuple(sorted((name, cls) for name, cls in METHOD_SETTINGS.items()))
    if key not in _SCHEMAS:
        fields = [(name, cls, field(default_factory=cls)) for name, cls in key]
        _SCHEMAS[key] = dataclasses.make_dataclass("Config", fields, bases=(Config,))
        _SCHEMAS[key].__module__ = __name__
    return _SCHEMAS[key]


def import_plugins(plugins) -> None:
    """Import modules (`my_pkg.my_method`) or files (`path/to/method.py`) that register methods."""
    import importlib
    import importlib.util
    import sys

    for plugin in plugins or ():
        plugin = str(plugin)
        if plugin.endswith(".py"):
            path = Path(plugin).resolve()
            name = f"advcl_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
            if name in sys.modules:
                continue
            if not path.is_file():
                raise ConfigError(f"config key 'train.plugins': file {plugin} does not exist")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            try:
                importlib.import_module(plugin)
            except ModuleNotFoundError as e:
                raise ConfigError(f"config key 'train.plugins': cannot import {plugin!r} ({e}); give a module on "
                                  "the Python path or a .py file") from None


def _merge(base, other, source: str):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        if e.full_key in MOVED:
            raise ConfigError(f"config key '{e.full_key}' in {source} is now '{MOVED[e.full_key]}' (the method's "
                              "own section); rename it") from None
        parent = e.full_key.rsplit(".", 1)[0] if "." in e.full_key else ""
        node = OmegaConf.select(base, parent) if parent else base
        valid = ", ".join(sorted(node.keys())) if node is not None and hasattr(node, "keys") else "?"
        raise ConfigError(f"unknown config key '{e.full_key}' in {source}; "
                          f"valid keys{' under ' + repr(parent) if parent else ''}: {valid}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key '{e.full_key}' in {source}: {e.msg}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults ← YAML preset ← `key=value` overrides, validated; returns a `Config`."""
    preset = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; presets live in configs/ (e.g. configs/demo.yaml)")
        preset = OmegaConf.load(path)
    _import_plugins_named(preset, overrides)
    cfg = OmegaConf.structured(schema())
    if preset is not None:
        cfg = _merge(cfg, preset, f"config file {path}")
    return _apply_overrides(cfg, overrides)


def config_from_yaml(text: str) -> Config:
    """A config from its resolved YAML (`to_yaml`), e.g. a run's config.yaml or a pickled config."""
    node = OmegaConf.create(text)
    _import_plugins_named(node, ())
    return _apply_overrides(_merge(OmegaConf.structured(schema()), node, "resolved config"), ())


def _import_plugins_named(preset, overrides) -> None:
    """`train.plugins` of the preset and the overrides, imported before the schema is built."""
    plugins = list(OmegaConf.select(preset, "train.plugins", default=None) or []) if preset is not None else []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "train.plugins":
            plugins = list(OmegaConf.from_dotlist([item]).train.plugins or [])
    import_plugins(plugins)


def with_overrides(cfg: Config, values: dict[str, object], source: str = "overrides") -> Config:
    """A validated copy of `cfg` with dotted keys set to `values` (taken as they are, not parsed as YAML)."""
    nested: dict = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _apply_overrides(_merge(OmegaConf.structured(cfg), nested, source), ())


def _apply_overrides(node, overrides) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=10)")
        node = _merge(node, OmegaConf.from_dotlist([item]), f"override {item!r}")
    try:
        result = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key '{e.full_key}': {e.msg}") from None
    validate(result)
    return result


def validate(cfg: Config) -> None:
    """Value checks the types cannot express; names the key and the accepted values."""
    from .data import DATASETS
    from .methods import METHODS
    from .models import BACKBONES

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}")

    need(cfg.data.name in DATASETS, "data.name", f"{cfg.data.name!r} is not one of {list(DATASETS)}")
    need(cfg.train.method in METHODS, "train.method", f"{cfg.train.method!r} is not one of {sorted(METHODS)}")
    need(cfg.model.arch in BACKBONES, "model.arch", f"{cfg.model.arch!r} is not one of {sorted(BACKBONES)}")
    need(cfg.train.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
    need(cfg.train.amp in ("auto", "bf16", "fp32"), "train.amp", "must be auto, bf16 or fp32")
    need(cfg.train.engine in ENGINES, "train.engine", f"{cfg.train.engine!r} is not one of {list(ENGINES)}")
    need(cfg.train.zero_stage in (0, 1, 2), "train.zero_stage", "must be 0, 1 or 2 (ZeRO-3 shards the weights, "
         "which the attacks' plain forwards cannot use)")
    for key in ("train.epochs", "train.batch_size", "train.ckpt_every", "train.log_every", "model.width",
                "views.size", "loss.temperature", "optim.lr", "finetune.epochs", "finetune.batch_size",
                "eval.batch_size", "pseudo.iters", "pseudo.init_sample_per_k"):
        need(functools.reduce(getattr, key.split("."), cfg) > 0, key, "must be > 0")
    need(cfg.data.workers >= 0, "data.workers", "must be >= 0")
    need(cfg.data.format in (None, *DATA_FORMATS), "data.format", f"{cfg.data.format!r} is not one of "
         f"{list(DATA_FORMATS)} (or null: ffcv when data.beton is set)")
    need(cfg.data.format != "ffcv" or cfg.data.beton is not None, "data.format",
         "ffcv needs data.beton, the .beton of data.name/data.split (write it with tools/write_ffcv.py)")
    need(cfg.data.image_size is None or cfg.data.image_size > 0, "data.image_size", "must be > 0 (or null)")
    need(0 <= cfg.optim.warmup_epochs < cfg.train.epochs, "optim.warmup_epochs", "must be in [0, train.epochs)")
    a = cfg.attack
    need(a.eps >= 0 and a.step_size >= 0 and min(a.steps, a.supervised_steps, a.eval_steps) >= 0, "attack",
         "eps, step_size and the step counts must be >= 0")
    need(cfg.attack.eps_ramp_epochs >= 0, "attack.eps_ramp_epochs", "must be >= 0 (0: constant ε)")
    need(0 < cfg.views.crop_scale_min <= 1, "views.crop_scale_min", "must be in (0, 1]")
    for name in METHOD_SETTINGS:
        section = getattr(cfg, name, None)
        if hasattr(section, "check"):
            section.check(lambda ok, key, msg, name=name: need(ok, f"{name}.{key}", msg))
    need(all(k >= 2 for k in cfg.pseudo.ks), "pseudo.ks", "every K must be >= 2")
    need(cfg.pseudo.init in KMEANS_INITS, "pseudo.init", f"{cfg.pseudo.init!r} is not one of {list(KMEANS_INITS)}")
    need(cfg.pseudo.pca is None or cfg.pseudo.pca > 0, "pseudo.pca", "must be > 0 (or null for no PCA)")
    f = cfg.finetune
    need(f.mode in FINETUNE_MODES, "finetune.mode", f"{f.mode!r} is not one of {list(FINETUNE_MODES)}")
    need(f.dataset is None or f.dataset in DATASETS, "finetune.dataset",
         f"{f.dataset!r} is not one of {list(DATASETS)}")
    need(f.lr is None or f.lr > 0, "finetune.lr", "must be > 0 (or null for the mode's default)")
    need(0 <= f.val_fraction < 1, "finetune.val_fraction", "must be in [0, 1)")
    need(cfg.eval.aa_n is None or cfg.eval.aa_n > 0, "eval.aa_n", "must be > 0 (or null for the whole test set)")
    need(cfg.eval.square_queries >= 0, "eval.square_queries", "must be >= 0 (0 leaves Square out of the curves)")
    need(not cfg.eval.curves or cfg.attack.eps > 0, "eval.curves", "needs attack.eps > 0 (the curves scale with it)")
    need(cfg.pipeline.tsne_n == 0 or cfg.pipeline.tsne_n >= 5, "pipeline.tsne_n", "must be >= 5 (or 0: no t-SNE)")
    for mode in cfg.pipeline.finetune:
        need(mode in FINETUNE_MODES, "pipeline.finetune", f"{mode!r} is not one of {list(FINETUNE_MODES)}")
    for name in [*cfg.pipeline.baselines, cfg.pipeline.fpre_method]:
        need(name in METHODS, "pipeline.baselines" if name != cfg.pipeline.fpre_method else "pipeline.fpre_method",
             f"{name!r} is not a registered method ({sorted(METHODS)})")
    for stage in ("pretrain", "cluster", "finetune", "evaluate"):
        nodes = getattr(cfg.launch, f"{stage}_nodes")
        need(nodes is None or nodes > 0, f"launch.{stage}_nodes", "must be > 0 (or null for --nodes)")
    if cfg.pseudo.labels is not None:
        need(Path(cfg.pseudo.labels).is_file(), "pseudo.labels",
             f"file {cfg.pseudo.labels} does not exist; run the clustering stage or set pseudo.labels=null")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def build_parser(description: str, add_help: bool = True) -> argparse.ArgumentParser:
    """The argument parser every stage CLI shares (and tools/submit.py extends): a preset plus `key=value`
    overrides."""
    parser = argparse.ArgumentParser(description=description, add_help=add_help,
                                     epilog="Overrides use dotted keys, e.g. train.epochs=10 data.root=/data.")
    parser.add_argument("--config", default=None, help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
