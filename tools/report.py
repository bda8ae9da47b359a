#!/usr/bin/env python
"""Gather every results.json under DIR into one table: printed as markdown, written to DIR/report.md and
DIR/report.csv. For a sweep from tools/submit.py --sweep, each row shows its point's values.
With --paper TABLE, also the AdvCL paper's layout of that table (rows = methods or the ablation's settings,
columns = dataset × SLF/ALF/AFF with AA/RA/SA), the published numbers beside ours and the differences:
DIR/report_<table>.md, .csv and .png (SA vs AA); --paper auto reads the table from the sweep's name.
python tools/report.py runs/cifar10_k_ablation-20261125-101500
python tools/report.py runs/table1 --paper table1"""
import argparse
import sys

from advcl_dist.config_schema import UserError
from advcl_dist.report import write_report
from advcl_dist.report_paper import TABLES, resolve_table, write_paper_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", metavar="DIR", help="a run, pipeline or sweep folder (searched recursively)")
    parser.add_argument("--paper", choices=[*TABLES, "auto"], default=None,
                        help="also write the paper's layout of this table beside the published numbers")
    args = parser.parse_args()
    try:
        table, n = write_report(args.folder)
        if args.paper:
            name = resolve_table(args.folder, args.paper)
            table, written = write_paper_report(args.folder, name)
    except (FileNotFoundError, UserError) as e:  # no folder, no results, a damaged results.json
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(table, end="")
    print(f"[report] {n} rows → {args.folder}/report.md, report.csv", file=sys.stderr)
    if args.paper:
        print(f"[report] {name} → {', '.join(str(p) for p in written)}", file=sys.stderr)
