#!/usr/bin/env python
"""Export a finetuning run's weights as safetensors (no pickle: loading them runs no code), into RUN_DIR/export/:
classifier.safetensors (our key names; advcl_dist.evaluate.load_classifier reads it), encoder.safetensors
(the served BN branch as plain BatchNorm, torchvision key names) and export.json (architecture, BN branches,
threat model, input range, results, source sha256, key mapping rule).
python tools/export.py runs/demo/advcl-slf
python tools/export.py runs/demo/advcl --encoder-only   # a pretraining run: its encoder alone"""
import argparse
import sys

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finetuning run folder (classifier.pt); with "
                        "--encoder-only also a pretraining run folder (checkpoint.pt)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/export)")
    parser.add_argument("--force", action="store_true", help="overwrite the files of an existing export")
    parser.add_argument("--encoder-only", action="store_true", help="write encoder.safetensors and export.json only")
    parser.add_argument("--branch", default=None, help="BN branch of a pretraining run's encoder to serve "
                        "(default pgd; a classifier serves its own)")
    args = parser.parse_args()
    from advcl_dist.config import ConfigError  # torch: after parsing, so --help is instant
    from advcl_dist.export import export_run

    try:
        written = export_run(args.run_dir, args.out, args.force, args.encoder_only, args.branch)
    except (FileNotFoundError, FileExistsError, ConfigError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(written)
