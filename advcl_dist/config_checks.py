"""Value checks the types cannot express, for every field of every section; each names the key and the fix.

Nonsense that would pass silently is refused here, before any work starts: a negative momentum, a
probability of 7, an infinite learning rate, an unknown split or BN branch, an empty K list.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

from .config_schema import Config, ConfigError

FINETUNE_MODES = ("slf", "alf", "aff")
ENGINES = ("ddp", "deepspeed")
KMEANS_INITS = ("kmeans++", "random")
DATA_FORMATS = ("ffcv", "torchvision")
MAX_WORKERS = 128  # per rank; more loader processes than this is a typo, not a setting


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _floats(node, prefix: str = ""):
    """(dotted key, value) of every float in the config tree."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", value


def _value(cfg: Config, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


def validate(cfg: Config) -> None:
    from .aa_subset import AA_RULES
    from .config import METHOD_SETTINGS
    from .data import DATASETS
    from .data.datasets import SPLITS
    from .methods import METHODS, VARIANTS
    from .models import BACKBONES, BRANCHES
    from .models.resnet import INITS

    need = _need
    for key, value in _floats(cfg):
        need(math.isfinite(value), key, f"{value} is not a finite number; give a finite value (e.g. the default "
             "in advcl_dist/config_schema.py)")
    d, t, o, v, a, p, f, e = (cfg.data, cfg.train, cfg.optim, cfg.views, cfg.attack, cfg.pseudo, cfg.finetune,
                              cfg.eval)
    need(d.name in DATASETS, "data.name", f"{d.name!r} is not one of {list(DATASETS)}")
    need(d.split in SPLITS[d.name], "data.split", f"{d.split!r} is not a split of {d.name}: {list(SPLITS[d.name])}")
    if t.method in VARIANTS:
        options = " ".join(f"{k}={v}" for k, v in VARIANTS[t.method].items())
        need(False, "train.method", f"{t.method!r} is a variant, not a method: run it as {options}, or list it in "
             "pipeline.baselines")
    need(t.method in METHODS, "train.method", f"{t.method!r} is not one of {sorted(METHODS)}")
    need(cfg.model.arch in BACKBONES, "model.arch", f"{cfg.model.arch!r} is not one of {sorted(BACKBONES)}")
    need(t.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
    need(t.amp in ("auto", "bf16", "fp32"), "train.amp", "must be auto, bf16 or fp32")
    need(t.engine in ENGINES, "train.engine", f"{t.engine!r} is not one of {list(ENGINES)}")
    need(t.zero_stage in (0, 1, 2), "train.zero_stage", "must be 0, 1 or 2 (ZeRO-3 shards the weights, "
         "which the attacks' plain forwards cannot use)")
    for key in ("train.epochs", "train.batch_size", "train.ckpt_every", "train.log_every", "model.width",
                "model.proj_dim", "views.size", "loss.temperature", "optim.lr", "finetune.epochs",
                "finetune.batch_size", "eval.batch_size", "pseudo.iters", "pseudo.init_sample_per_k"):
        need(_value(cfg, key) > 0, key, "must be > 0")
    for key in ("train.seed", "eval.seed", "optim.weight_decay", "optim.min_lr", "optim.warmup_start_lr",
                "views.brightness", "views.contrast", "views.saturation", "views.padding", "finetune.weight_decay",
                "finetune.trades_beta"):
        need(_value(cfg, key) >= 0, key, "must be >= 0")
    for key in ("views.jitter_p", "views.gray_p"):
        need(0 <= _value(cfg, key) <= 1, key, "is a probability: must be in [0, 1]")
    need(0 <= v.hue <= 0.5, "views.hue", "must be in [0, 0.5] (torchvision's ColorJitter hue range)")
    need(0 < v.crop_scale_min <= 1, "views.crop_scale_min", "must be in (0, 1]")
    for key in ("optim.momentum", "finetune.momentum"):
        need(0 <= _value(cfg, key) < 1, key, "must be in [0, 1)")
    need(cfg.model.proj_hidden is None or cfg.model.proj_hidden > 0, "model.proj_hidden", "must be > 0 (or null)")
    need(cfg.loss.base_temperature is None or cfg.loss.base_temperature > 0, "loss.base_temperature",
         "must be > 0, or null to leave the loss unscaled")
    need(0 <= d.workers <= MAX_WORKERS, "data.workers", f"must be in [0, {MAX_WORKERS}] (loader processes per rank)")
    need(d.format in (None, *DATA_FORMATS), "data.format", f"{d.format!r} is not one of "
         f"{list(DATA_FORMATS)} (or null: ffcv when data.beton is set)")
    need(d.format != "ffcv" or d.beton is not None, "data.format",
         "ffcv needs data.beton, the .beton of data.name/data.split (write it with tools/write_ffcv.py)")
    need(d.image_size is None or d.image_size > 0, "data.image_size", "must be > 0 (or null)")
    need(not d.scan or d.name == "imagefolder", "data.scan", "scans image files: only for data.name=imagefolder")
    need(0 <= o.warmup_epochs < t.epochs, "optim.warmup_epochs", "must be in [0, train.epochs)")
    need(o.min_lr <= o.lr, "optim.min_lr", f"must be <= optim.lr ({o.lr}), the start of the cosine")
    need(0 <= a.eps <= 1, "attack.eps", "must be in [0, 1] (images are in [0, 1]; 8/255 is the paper's)")
    need(0 <= a.step_size <= 1, "attack.step_size", "must be in [0, 1]")
    for key in ("attack.steps", "attack.supervised_steps", "attack.eval_steps"):
        need(_value(cfg, key) >= 0, key, "must be >= 0")
    need(a.eps_ramp_epochs >= 0, "attack.eps_ramp_epochs", "must be >= 0 (0: constant ε)")
    for name in METHOD_SETTINGS:
        section = getattr(cfg, name, None)
        if hasattr(section, "check"):
            section.check(lambda ok, key, msg, name=name: need(ok, f"{name}.{key}", msg))
    need(len(p.ks) > 0, "pseudo.ks", "must list at least one K (e.g. [2, 10, 50, 100, 500])")
    need(all(k >= 2 for k in p.ks), "pseudo.ks", "every K must be >= 2")
    need(len(set(p.ks)) == len(p.ks), "pseudo.ks", "lists a K twice")
    need(p.init in KMEANS_INITS, "pseudo.init", f"{p.init!r} is not one of {list(KMEANS_INITS)}")
    need(p.pca is None or p.pca > 0, "pseudo.pca", "must be > 0 (or null for no PCA)")
    need(p.fpre_size is None or p.fpre_size > 0, "pseudo.fpre_size",
         "must be > 0, the side f_pre's images are resized to (e.g. 224 for an ImageNet ResNet-50), or null")
    need(cfg.model.init in INITS, "model.init", f"{cfg.model.init!r} is not one of {list(INITS)}")
    need(f.mode in FINETUNE_MODES, "finetune.mode", f"{f.mode!r} is not one of {list(FINETUNE_MODES)}")
    need(f.dataset is None or f.dataset in DATASETS, "finetune.dataset",
         f"{f.dataset!r} is not one of {list(DATASETS)}")
    need(f.bn_branch in BRANCHES, "finetune.bn_branch", f"{f.bn_branch!r} is not one of {list(BRANCHES)}")
    need(f.lr is None or f.lr > 0, "finetune.lr", "must be > 0 (or null for the mode's default)")
    need(0 < f.gamma <= 1, "finetune.gamma", "must be in (0, 1] (the lr factor at each milestone)")
    need(all(m > 0 for m in f.milestones) and list(f.milestones) == sorted(set(f.milestones)),
         "finetune.milestones", "must be increasing epochs > 0")
    need(0 <= f.val_fraction < 1, "finetune.val_fraction", "must be in [0, 1)")
    need(e.aa_n is None or e.aa_n > 0, "eval.aa_n", "must be > 0 (or null for the whole test set)")
    need(e.aa_subset in AA_RULES, "eval.aa_subset", f"{e.aa_subset!r} is not one of {list(AA_RULES)}")
    need(e.aa_seed >= 0, "eval.aa_seed", "must be >= 0")
    need(e.aa_indices is None or Path(e.aa_indices).is_file(), "eval.aa_indices",
         f"file {e.aa_indices} does not exist; give a file of test-image indices or <class>/<file> lines "
         "(or .npy), or set eval.aa_indices=null for eval.aa_subset")
    need(e.square_queries >= 0, "eval.square_queries", "must be >= 0 (0 leaves Square out of the curves)")
    need(not e.curves or a.eps > 0, "eval.curves", "needs attack.eps > 0 (the curves scale with it)")
    need(cfg.pipeline.tsne_n == 0 or cfg.pipeline.tsne_n >= 5, "pipeline.tsne_n", "must be >= 5 (or 0: no t-SNE)")
    for mode in cfg.pipeline.finetune:
        need(mode in FINETUNE_MODES, "pipeline.finetune", f"{mode!r} is not one of {list(FINETUNE_MODES)}")
    need(cfg.pipeline.fpre_method in METHODS, "pipeline.fpre_method",
         f"{cfg.pipeline.fpre_method!r} is not a registered method ({sorted(METHODS)})")
    for name in cfg.pipeline.baselines:
        need(name in METHODS or name in VARIANTS, "pipeline.baselines",
             f"{name!r} is not a registered method ({sorted(METHODS)}) or variant ({sorted(VARIANTS)})")
    for stage in ("pretrain", "cluster", "finetune", "evaluate"):
        nodes = getattr(cfg.launch, f"{stage}_nodes")
        need(nodes is None or nodes > 0, f"launch.{stage}_nodes", "must be > 0 (or null for --nodes)")
    if p.labels is not None:
        need(Path(p.labels).is_file(), "pseudo.labels",
             f"file {p.labels} does not exist; run the clustering stage or set pseudo.labels=null")



def check_given_options(cfg: Config, keys) -> None:
    """An option given (an override key) to a method that neither train.method nor pipeline.baselines runs
    is a mistake — a typo in train.method, or an option meant for another method: refused, naming the key.
    Presets may set any method's options (one preset serves a pipeline of several methods)."""
    from .config import METHOD_SETTINGS
    from .methods import METHODS, method_values

    used = {cfg.train.method, cfg.pipeline.fpre_method}
    for values in [{"train.method": cfg.train.method}, *map(method_values, cfg.pipeline.baselines)]:
        used |= {values["train.method"], *(key.split(".")[0] for key in values if key != "train.method")}
        post = METHODS[values["train.method"]].post_process(_with_values(cfg, values))
        used |= {post.method} if post is not None else set()
    for key in keys:
        section = key.split(".")[0]
        _need(section not in METHOD_SETTINGS or section in used, key,
              f"is an option of method {section}, which this run does not train (train.method={cfg.train.method}, "
              f"pipeline.baselines={list(cfg.pipeline.baselines)}); remove it, or set train.method={section}")


def _with_values(cfg: Config, values: dict) -> Config:
    """A shallow copy of `cfg` with `section.field` values set (no validation: for planning only)."""
    cfg = dataclasses.replace(cfg)
    for key, value in values.items():
        section, name = key.split(".")
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **{name: value}))
    return cfg
