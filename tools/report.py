#!/usr/bin/env python
"""Gather every results.json under DIR into one table: printed as markdown, written to DIR/report.md and
DIR/report.csv. For a sweep from tools/submit.py --sweep, each row shows its point's values.
python tools/report.py runs/cifar10_k_ablation-20261125-101500"""
import argparse
import sys

from advcl_dist.config_schema import UserError
from advcl_dist.report import write_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", metavar="DIR", help="a run, pipeline or sweep folder (searched recursively)")
    args = parser.parse_args()
    try:
        table, n = write_report(args.folder)
    except (FileNotFoundError, UserError) as e:  # no folder, no results, a damaged results.json
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(table, end="")
    print(f"[report] {n} rows → {args.folder}/report.md, report.csv", file=sys.stderr)
