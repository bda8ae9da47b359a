"""The one entry point every stage CLI in tools/ goes through: parse, build the config, run."""
from __future__ import annotations

import sys
from collections.abc import Callable

from .config import Config, ConfigError, build_parser, config_from_args


def run_stage(stage: Callable[[Config], object], description: str, argv: list[str] | None = None) -> int:
    """Parse `--config X key=value ...`, run `stage(cfg)`; a user error prints one line and exits 2."""
    args = build_parser(description).parse_args(argv)
    try:
        stage(config_from_args(args))
    except (ConfigError, FileNotFoundError) as e:  # bad keys/values, missing data or checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
