"""The one entry point every stage CLI in tools/ goes through: parse, build the config, run."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

from .config import Config, ConfigError, build_parser, config_from_args
from .distributed import launch_env
from .engine.preemption import stop_on_signal


def run_stage(stage: Callable[[Config], object], description: str, argv: list[str] | None = None,
              multi_rank: bool = False) -> int:
    """Parse `--config X key=value ...`, run `stage(cfg)`; a user error prints one line and exits 2.

    Stages that are not `multi_rank` refuse a multi-process launch instead of running N copies that
    write the same files. Inside a SLURM job, SIGUSR2 (the time-limit warning of `--signal`) makes
    pretraining stop at a step boundary with its checkpoint written (slurm/examples/ requeue then).
    """
    args = build_parser(description).parse_args(argv)
    try:
        launch = launch_env()
        if not multi_rank and launch is not None and launch.world_size > 1:
            raise ConfigError(f"{stage.__name__} runs in one process, but this is rank {launch.rank} of "
                              f"{launch.world_size} ({launch.launcher}); start it with plain python (one task)")
        graceful = multi_rank and "SLURM_JOB_ID" in os.environ
        with stop_on_signal() if graceful else contextlib.nullcontext():
            stage(config_from_args(args))
    except (ConfigError, FileNotFoundError) as e:  # bad keys/values, missing data or checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
