#!/usr/bin/env python
"""Gather every results.json under DIR into one table: printed as markdown, written to DIR/report.md and
DIR/report.csv. For a sweep from tools/submit.py --sweep, each row shows its point's values. Accuracies show
their Wilson 95 % intervals; a sweep over train.seed adds the mean ± std over seeds (report_seeds.csv).
With --compare A B, a paired comparison of methods A and B on the same test images (their flags.npz): the
difference A − B with its interval, the images only one gets right and McNemar's p, per seed and as mean ± std
(report.md's "Paired comparison" section, report_compare.csv).
With --paper TABLE, also the AdvCL paper's layout of that table (rows = methods or the ablation's settings,
columns = dataset × SLF/ALF/AFF with AA/RA/SA), the published numbers beside ours and the differences:
DIR/report_<table>.md, .csv and .png (SA vs AA); --paper auto reads the table from the sweep's name.
python tools/report.py runs/cifar10_k_ablation-20261125-101500
python tools/report.py runs/table1-seeds --compare advcl simclr
python tools/report.py runs/table1 --paper table1"""
import argparse
import sys

from advcl_dist.config_schema import UserError
from advcl_dist.report import write_report
from advcl_dist.report_compare import COMPARE_TITLE
from advcl_dist.report_paper import TABLES, resolve_table, write_paper_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", metavar="DIR", help="a run, pipeline or sweep folder (searched recursively)")
    parser.add_argument("--paper", choices=[*TABLES, "auto"], default=None,
                        help="also write the paper's layout of this table beside the published numbers")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                        help="paired comparison of the runs of method A against those of method B (results.json's "
                             "'method'), run by run on the same test images")
    args = parser.parse_args()
    try:
        table, n = write_report(args.folder, tuple(args.compare) if args.compare else None)
        if args.paper:
            name = resolve_table(args.folder, args.paper)
            paper, written = write_paper_report(args.folder, name)
            # the paper's layout replaces the plain table on stdout; a comparison asked for still follows it
            table = paper + (f"\n{table[table.index(COMPARE_TITLE):]}" if args.compare else "")
    except (FileNotFoundError, UserError) as e:  # no folder, no results, a damaged results.json or flags.npz
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(table, end="")
    print(f"[report] {n} rows → {args.folder}/report.md, report.csv", file=sys.stderr)
    if args.compare:
        print(f"[report] {args.compare[0]} − {args.compare[1]} → {args.folder}/report_compare.csv", file=sys.stderr)
    if args.paper:
        print(f"[report] {name} → {', '.join(str(p) for p in written)}", file=sys.stderr)
