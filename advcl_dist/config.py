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
from dataclasses import field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
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
                raise ConfigError(f"config key 'train.plugins': file {plugin} does not exist; give the path of a .py "
                                  "file that registers methods (relative to the working folder), or a module name")
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
        raise ConfigError(f"config key '{e.full_key}' in {source}: {_first_line(e.msg)}; {TYPE_FIX}") from None


TYPE_FIX = "give a value of the key's type (its default and comment are in advcl_dist/config_schema.py)"


def _first_line(message: str) -> str:
    """OmegaConf's message without the full_key / object_type lines it appends."""
    return (str(message).strip().splitlines() or [""])[0]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults ← YAML preset ← `key=value` overrides, validated; returns a `Config`."""
    preset = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; presets live in configs/ (e.g. configs/demo.yaml)")
        preset = _read_preset(path)
    _import_plugins_named(preset, overrides)
    cfg = OmegaConf.structured(schema())
    if preset is not None:
        cfg = _merge(cfg, preset, f"config file {path}")
    return _apply_overrides(cfg, overrides)


def yaml_problem(error) -> str:
    """` at line L, column C (what the parser expected)` of a YAML syntax error, for one-line messages."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where} ({getattr(error, 'problem', None) or str(error).splitlines()[0]})"


def _read_preset(path: Path):
    """A preset file as a mapping; ConfigError naming the file (and the line) when it is not YAML or not a mapping."""
    import yaml

    try:
        preset = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML{yaml_problem(e)}; fix it there (an unclosed "
                          "bracket or quote, a tab for indentation) or start from a preset in configs/") from None
    except (OSError, UnicodeDecodeError, OmegaConfBaseException) as e:
        raise ConfigError(f"config file {path} cannot be read ({type(e).__name__}: {e}); point --config at a "
                          "YAML preset (e.g. configs/demo.yaml)") from None
    if not isinstance(preset, DictConfig):
        raise ConfigError(f"config file {path} holds a {type(preset).__name__.replace('Config', '').lower()}, "
                          "not a mapping of keys to values; write it as sections, e.g. 'train:' then "
                          "'  epochs: 10' (override single keys as key=value arguments instead)")
    return preset


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
    return _apply_overrides(_merge(OmegaConf.structured(cfg), nested, source), (), given=list(values))


def _apply_overrides(node, overrides, given=()) -> Config:
    """`given`: keys set by the caller beside `overrides` (checked like override keys)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=10)")
        node = _merge(node, OmegaConf.from_dotlist([item]), f"override {item!r}")
    try:
        result = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key '{e.full_key}': {_first_line(e.msg)}; {TYPE_FIX}") from None
    from .config_checks import check_given_options, validate

    validate(result)
    check_given_options(result, [*given, *(item.partition("=")[0].strip() for item in overrides)])
    return result


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
