"""The one entry point every stage CLI in tools/ goes through: parse, build the config, run."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable

from .config import ConfigError, build_parser, config_from_args


def run_stage(stage: str | Callable[..., object], description: str, argv: list[str] | None = None) -> int:
    """Parse `--config X key=value ...`, run `stage(cfg, stop=...)`; a user error prints one line and exits 2.

    `stage` may be named as "module:function": it is imported after the arguments are parsed, so that
    `--help` answers without importing torch (seconds saved on every call).
    Every stage runs on one process or on every rank of a launch (torchrun, srun). Inside a SLURM job,
    SIGUSR2 (the time-limit warning of `--signal`) becomes the stop request the stage polls: training
    stops at a step boundary with its checkpoint written, evaluation after its current block.
    """
    args = build_parser(description).parse_args(argv)
    if isinstance(stage, str):
        module, name = stage.split(":")
        stage = getattr(importlib.import_module(module), name)
    from .engine.preemption import stop_on_signal  # torch

    try:
        graceful = "SLURM_JOB_ID" in os.environ
        with stop_on_signal() if graceful else contextlib.nullcontext() as stop:
            stage(config_from_args(args), stop=stop)
    except (ConfigError, FileNotFoundError) as e:  # bad keys/values, missing data or checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["run_stage"]
