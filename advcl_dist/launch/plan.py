"""Which jobs a submission makes: one stage, the pipeline's stages, or either over a sweep's grid.

A job group is one stage for every point of a sweep (a job array when there are several points),
with the resources of its kind of stage (every stage runs on every task of its job: `--nodes`, or
`launch.<kind>_nodes` from the config) and the groups it waits for.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..cluster import CLUSTERS as CLUSTERS_FILE
from ..cluster import cluster
from ..config import Config, ConfigError, with_overrides, yaml_problem
from ..engine import pretrain
from ..evaluate import RESULTS, evaluate
from ..finetune import finetune
from ..pipeline import Stage, plan_stages, run_pipeline
from .resources import Resources

STAGE_NAMES = ("pretrain", "cluster", "finetune", "evaluate", "pipeline")
# stage → (function, what marks it done, polls the stop request)
SINGLE_STAGES = {"pretrain": (pretrain, "finished", True), "cluster": (cluster, CLUSTERS_FILE, False),
                 "finetune": (finetune, RESULTS, True), "evaluate": (evaluate, RESULTS, True)}


@dataclass
class JobGroup:
    name: str
    stages: list[Stage]  # one per sweep point
    resources: Resources
    needs: tuple[str, ...]


@dataclass
class SweepPoint:
    folder: str  # relative to the sweep's output folder
    swept: dict  # dotted key → this point's value of the grid
    common: dict  # the sweep's overrides for every point

    @property
    def values(self) -> dict:
        return {**self.common, **self.swept}


def stages_for(stage: str, cfg: Config) -> list[Stage]:
    if stage == "pipeline":
        stages = plan_stages(cfg)
        # The last job only tabulates (every stage is done by then): summary.md / summary.json.
        return stages + [Stage("summary", cfg, {"out_dir": cfg.out_dir}, run_pipeline, "summary.md",
                               tuple(s.name for s in stages), kind="summary")]
    run, done_when, graceful = SINGLE_STAGES[stage]
    return [Stage(stage, cfg, {"out_dir": cfg.out_dir}, run, done_when, (), kind=stage, graceful=graceful)]


def stage_resources(stage: Stage, resources: Resources) -> Resources:
    """The command line's resources, with the config's node count for this kind of stage (launch.*)."""
    if stage.kind == "summary":  # only tabulates: one CPU
        return dataclasses.replace(resources, nodes=1, gpus_per_node=0, cpus_per_task=1)
    nodes = getattr(stage.base.launch, f"{stage.kind}_nodes")
    return dataclasses.replace(resources, nodes=nodes) if nodes else resources


def plan_jobs(stage: str, configs: list[Config], resources: Resources) -> list[JobGroup]:
    per_point = [stages_for(stage, cfg) for cfg in configs]
    names = [s.name for s in per_point[0]]
    for cfg, stages in zip(configs, per_point):
        if [s.name for s in stages] != names:
            raise ConfigError(f"sweep point {cfg.out_dir} has the stages {[s.name for s in stages]}, the first "
                              f"point {names}: every point of a sweep must run the same stages (one array each)")
    groups = []
    for i, name in enumerate(names):
        stages = [p[i] for p in per_point]
        groups.append(JobGroup(name, stages, stage_resources(stages[0], resources), stages[0].needs))
    return groups


def preflight(stage: str, cfg: Config) -> None:
    """What a single stage reads must exist before its job waits in the queue for hours."""
    need = {"cluster": ("pseudo.fpre", cfg.pseudo.fpre, "a SimCLR checkpoint.pt (f_pre)"),
            "finetune": ("finetune.checkpoint", cfg.finetune.checkpoint, "a pretraining checkpoint.pt"),
            "evaluate": ("eval.checkpoint", cfg.eval.checkpoint, "a classifier.pt from finetuning")}.get(stage)
    if need is None:
        return
    key, value, what = need
    if value is None:
        raise ConfigError(f"--stage {stage} needs {key}=PATH ({what})")
    if not Path(value).is_file():
        raise ConfigError(f"{key}={value} does not exist; it must be {what} on the shared file system")


def read_sweep(path: str | Path) -> tuple[dict, list[SweepPoint]]:
    """`grid:` (dotted key → list of values; every combination is a point), optional `overrides:`
    (dotted key → value, for every point) and `config:` (the preset, when --config is not given)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist; sweeps live in configs/sweeps/")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not valid YAML{yaml_problem(e)}; fix it there (an unclosed "
                          "bracket or quote, a tab for indentation), as in configs/sweeps/") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"sweep file {path} cannot be read ({type(e).__name__}: {e}); give a YAML file as in "
                          "configs/sweeps/") from None
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path} holds a {type(spec).__name__}, not a mapping; write it as in "
                          "configs/sweeps/, e.g. grid: {pseudo.ks: [[2, 10], [50]]}")
    unknown = set(spec) - {"grid", "overrides", "config", "description"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown keys {sorted(map(str, unknown))}; use grid, overrides, config, "
                          "description")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"sweep file {path}: 'grid' must map dotted keys to non-empty lists of values, "
                          "e.g. grid: {pseudo.ks: [[2, 10], [50]]}")
    common = spec.get("overrides") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"sweep file {path}: 'overrides' must map dotted keys to values")
    if isinstance(common.get("train.seed"), list):
        raise ConfigError(f"sweep file {path}: overrides give one train.seed to every point; to run several seeds, "
                          "list them under grid: (train.seed: [0, 1, 2]); tools/report.py gives their mean ± std")
    keys = list(grid)
    points = []
    for i, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        swept = dict(zip(keys, combo))
        points.append(SweepPoint(f"{i:02d}-{point_slug(swept)}", swept, common))
    return spec, points


def point_slug(values: dict) -> str:
    """A folder name a person can read: `ks=2,10_lr=0.1`."""
    parts = []
    for key, value in values.items():
        text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value
        parts.append(f"{key.rsplit('.', 1)[-1]}={re.sub(r'[^A-Za-z0-9.,=+-]', '', text)}")
    return "_".join(parts)[:80]


def sweep_configs(base: Config, output: Path, points: list[SweepPoint], sweep: str | Path) -> list[Config]:
    return [with_overrides(base, {**p.values, "out_dir": str(output / p.folder)}, f"sweep {sweep}, point {p.folder}")
            for p in points]
