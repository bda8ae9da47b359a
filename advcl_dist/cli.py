"""The one entry point every stage CLI in tools/ goes through: parse, build the config, run."""
from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable

from . import faults
from .config import build_parser, config_from_args
from .config_schema import UserError

INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C


def run_stage(stage: str | Callable[..., object], description: str, argv: list[str] | None = None) -> int:
    """Parse `--config X key=value ...`, run `stage(cfg, stop=...)`; a user error prints one line and exits 2.

    `stage` may be named as "module:function": it is imported after the arguments are parsed, so that
    `--help` answers without importing torch (seconds saved on every call).
    Every stage runs on one process or on every rank of a launch (torchrun, srun). Ctrl-C, and inside a
    SLURM job SIGUSR2 (the time-limit warning of `--signal`), become the stop request the stage polls:
    training stops at a step boundary with its checkpoint written, evaluation after its current block.
    """
    args = build_parser(description).parse_args(argv)
    faults.check_environment()
    if isinstance(stage, str):
        module, name = stage.split(":")
        stage = getattr(importlib.import_module(module), name)
    from .distributed import RankLostError  # torch
    from .engine.metrics import NonFiniteLossError
    from .engine.preemption import stop_on_signal

    signals = (signal.SIGINT, signal.SIGUSR2) if "SLURM_JOB_ID" in os.environ else (signal.SIGINT,)
    try:
        with stop_on_signal(*signals) as stop:
            stage(config_from_args(args), stop=stop)
    except (UserError, FileNotFoundError) as e:  # bad keys/values/files, missing data, an unwritable out_dir
        return _fail(f"error: {e}", 2)
    except NonFiniteLossError as e:
        return _fail(f"error: {e}", 1)
    except RankLostError as e:  # the survivors say it, whatever their rank
        return _fail(f"error: {e}", 1, every_rank=True)
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C twice): the steps since the last checkpoint are lost; run the same "
                     "command again to resume", INTERRUPTED)
    if stop.signal == signal.SIGINT:
        return _fail("stopped by Ctrl-C with the checkpoint written; run the same command again to resume",
                     INTERRUPTED)
    return 0


def _fail(message: str, code: int, every_rank: bool = False) -> int:
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(" ".join(message.split()), file=sys.stderr, flush=True)
    return code


__all__ = ["run_stage"]
