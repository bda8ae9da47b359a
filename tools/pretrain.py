#!/usr/bin/env python
"""Pretrain an encoder (AdvCL, SimCLR, ...): python tools/pretrain.py --config configs/demo.yaml [key=value ...]"""
import sys

from advcl_dist.config import ConfigError, build_parser, config_from_args
from advcl_dist.data import DatasetNotFoundError
from advcl_dist.engine import pretrain


def main(argv=None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    try:
        pretrain(config_from_args(args))
    except (ConfigError, DatasetNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
