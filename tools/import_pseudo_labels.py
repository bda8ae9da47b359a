#!/usr/bin/env python
"""Import pseudo-labels made elsewhere (the AdvCL authors' pickle: a dict 'pseudo_train_<K>' → one label per
training image) into <out_dir>/pseudo_labels.npy for the dataset of data.* and the Ks of pseudo.ks, then
pretrain with pseudo.labels=<out_dir>/pseudo_labels.npy. The pickle is read without running its code.
python tools/import_pseudo_labels.py --config configs/cifar10_advcl.yaml \\
    data/imagenet_clPretrain_pseudo_labels.pkl out_dir=runs/cifar10/imported data.root=data"""
import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Overrides use dotted keys, e.g. pseudo.ks=[10,100] data.root=/data.")
    parser.add_argument("--config", default=None, help="YAML preset (see configs/)")
    parser.add_argument("pickle", metavar="PKL", help="the pseudo-label pickle (e.g. the authors' "
                        "imagenet_clPretrain_pseudo_labels.pkl)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (out_dir=..., data.*)")
    args = parser.parse_args(argv)
    if "=" in args.pickle and not os.path.exists(args.pickle):
        parser.error(f"the first argument, {args.pickle!r}, must be the pickle's path (before the key=value overrides)")
    from advcl_dist.cluster.import_labels import import_pseudo_labels  # torch: after parsing, so --help is instant
    from advcl_dist.config import load_config
    from advcl_dist.config_schema import UserError

    try:
        written = import_pseudo_labels(load_config(args.config, args.overrides), args.pickle)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
