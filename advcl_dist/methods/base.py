"""The pretraining method interface (a plug-in) and the registry that maps `train.method` to a class.

A method is one file: a `Method` subclass registered by name, optionally with a settings dataclass
that becomes its own config section, declaring what it needs so that the pipeline and
`tools/submit.py` can plan the stages before it (`needs`). The training loop is engine/trainer.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from ..config import METHOD_SETTINGS, Config, ConfigError
from ..engine.objective import DataFacts, LoopSettings, Objective, StepContext, StepOutput
from ..engine.schedule import warmup_cosine
from ..losses import multiview_nt_xent
from ..models import AdvCLNet, build_model

METHODS: dict[str, type[Method]] = {}
# What a method may declare in `needs`:
NEEDS = {
    "pseudo_labels": "pseudo.labels from a clustering stage (the pipeline adds f_pre → cluster before it)",
    "labels": "the dataset's labels (a labelled data.split)",
    # `<name>.teacher` (a settings field): a standard self-supervised encoder's checkpoint.pt; the pipeline
    # pretrains `pipeline.fpre_method` (SimCLR) for it when the key is null
    "teacher": "a standard self-supervised teacher checkpoint (`<method>.teacher`)",
    # `<name>.init` (a settings field): the checkpoint.pt whose encoder training starts from; the pipeline sets
    # it to the method that declared this one as its post-processing (Method.post_process)
    "init": "the checkpoint.pt training starts from (`<method>.init`)",
}
# Settings field each need is read from / written to by the pipeline.
NEED_FIELDS = {"teacher": "teacher", "init": "init"}
VARIANTS: dict[str, dict] = {}  # variant name → config values ("train.method" and the method's options)


@dataclass(frozen=True)
class PostProcess:
    """What a method declares to run after its pretraining (e.g. DynACL++): cluster its own features into
    pseudo-labels with `ks`, then train `method` (registered, needs "init" and "pseudo_labels") from its
    checkpoint. Finetuning and evaluation then use that method's checkpoint."""

    method: str
    ks: tuple[int, ...]


def register(name: str, settings: type | None = None):
    """Class decorator: `train.method=<name>` selects the class; `settings` (a dataclass) is its config
    section `<name>.*` (defaults = the method's published defaults; a `check(need)` method validates it)."""
    def wrap(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise KeyError(f"method {name!r} registered twice")
        unknown = set(cls.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"method {name!r} declares unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
        missing = [NEED_FIELDS[n] for n in sorted(set(cls.needs) & set(NEED_FIELDS))
                   if settings is None or NEED_FIELDS[n] not in {f.name for f in fields(settings)}]
        if missing:
            raise ValueError(f"method {name!r} needs {missing} but its settings have no field of that name")
        cls.name = name
        METHODS[name] = cls
        if settings is not None:
            METHOD_SETTINGS[name] = settings
        return cls

    return wrap


def register_variant(name: str, method: str, **options) -> None:
    """A named variant of a registered method: `pipeline.baselines` (and sweeps) accept `name`, which runs
    `method` with `options` (dotted config keys, e.g. `{"dynacl.post": True}`) and labels its results `name`."""
    if name in METHODS or (name in VARIANTS and VARIANTS[name] != {"train.method": method, **options}):
        raise KeyError(f"variant {name!r} is already a method or another variant")
    VARIANTS[name] = {"train.method": method, **options}


def method_values(name: str) -> dict:
    """The config values that run the method or variant `name`."""
    if name in METHODS:
        return {"train.method": name}
    if name in VARIANTS:
        return dict(VARIANTS[name])
    raise ConfigError(f"{name!r} is not a registered method or variant; choose one of "
                      f"{sorted(METHODS)} or {sorted(VARIANTS)}")


class Method(Objective):
    """One pretraining objective. Subclasses set `branches` and `needs` and define `training_step`.

    `self.settings` is the method's own config section (None when it has none).
    """

    name = "?"
    branches: tuple[str, ...] = ("normal",)
    needs: frozenset[str] = frozenset()

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.settings = getattr(cfg, self.name, None) if self.name in METHOD_SETTINGS else None
        self.num_samples = self.num_classes = None
        self.device = torch.device("cpu")

    def loop_settings(self) -> LoopSettings:
        t, o = self.cfg.train, self.cfg.optim
        return LoopSettings(stage="pretrain", data=self.cfg.data, batch_size=t.batch_size, epochs=t.epochs,
                            checkpoint="checkpoint.pt", lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    def bind(self, facts: DataFacts, device: torch.device) -> None:
        self.num_samples, self.num_classes, self.device = facts.num_samples, facts.num_classes, device

    def lr_factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        o = self.cfg.optim
        return warmup_cosine(step, total_steps=total_steps, warmup_steps=round(o.warmup_epochs * steps_per_epoch),
                             lr=o.lr, min_lr=o.min_lr, warmup_start_lr=o.warmup_start_lr) / o.lr

    def pseudo_ks(self) -> tuple[int, ...]:
        return ()

    def build_model(self) -> AdvCLNet:
        m = self.cfg.model
        return build_model(m.arch, m.width, self.branches, m.proj_dim, m.proj_hidden, self.pseudo_ks(),
                           init=m.init)

    def contrastive(self, z: torch.Tensor) -> torch.Tensor:
        """Multi-view NT-Xent on `z` [B, V, D] over the global batch, times the configured factor."""
        loss_cfg = self.cfg.loss
        scale = loss_cfg.temperature / loss_cfg.base_temperature if loss_cfg.base_temperature else 1.0
        return scale * multiview_nt_xent(z, loss_cfg.temperature, gather=True)

    def training_step(self, ctx: StepContext) -> StepOutput:
        """`ctx.images` uint8 on the device; forward through `ctx.model` (maybe DDP), attack `ctx.module`.

        Draw every random number from `ctx.random` (reseeded each step), so that views do not depend on
        the number of ranks and a resumed run replays exactly. `ctx.labels` are the dataset's labels;
        only methods that declare `needs = {"labels"}` may use them.
        """
        raise NotImplementedError

    @classmethod
    def post_process(cls, cfg: Config) -> PostProcess | None:
        """What the pipeline runs after this method's pretraining (None: finetune its checkpoint directly)."""
        return None

    def describe(self) -> str:
        return self.name


def build_method(cfg: Config, num_samples: int | None = None, device: torch.device | str = "cpu",
                 num_classes: int = 0) -> Method:
    """The method `train.method`; bound to a dataset of `num_samples` images when given (else the loop binds it)."""
    if cfg.train.method not in METHODS:
        raise KeyError(f"train.method={cfg.train.method!r} is not one of {sorted(METHODS)}")
    method = METHODS[cfg.train.method](cfg)
    if num_samples is not None:
        method.bind(DataFacts(num_samples, num_classes), torch.device(device))
    return method


@contextmanager
def bn_mode(module: torch.nn.Module, eval_mode: bool = True):
    """The module in eval mode inside the block when `eval_mode` (BatchNorm on its running statistics, none
    updated: the authors' attacks), then back to the mode it had."""
    was_training = module.training
    if eval_mode:
        module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def split_views(t: torch.Tensor, views: int) -> torch.Tensor:
    """[V·B, D] rows in view-major order → [B, V, D]."""
    return t.reshape(views, -1, t.shape[-1]).transpose(0, 1)


__all__ = ["METHODS", "NEEDS", "NEED_FIELDS", "VARIANTS", "Method", "PostProcess", "StepContext", "StepOutput",
           "build_method", "method_values", "register", "register_variant", "split_views"]
