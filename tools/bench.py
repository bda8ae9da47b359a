#!/usr/bin/env python
"""Benchmarks; each prints a table and one JSON line last.

  kmeans   ensemble k-means (the clustering stage) on 1 and N processes vs scikit-learn:
           python tools/bench.py kmeans --rows 1000000 --dim 128 --procs 1 2
  loader   images/s through decode + transfer + the AdvCL views on the device, FFCV vs torchvision,
           on synthetic images generated once (in both formats) under --cache:
           python tools/bench.py loader --format ffcv --images 20000 --size 32
           (no --format: both, then their ratio; the JSON line is then one object with both runs)
  step     one AdvCL training step (views + both PGD attacks + update): the authors' one-forward-per-view
           reference, ours in fp32 and bf16 (and torch.compile), and a supervised step as the yardstick:
           python tools/bench.py step --arch resnet18 --batch auto --compile --json step.json
  eval     sharded evaluation images/s, PGD-20 and AutoAttack standard, on 1 vs N processes sharing the cores,
           of a ResNet-18 digits classifier trained first (cached under --cache); checks the flags are the same:
           python tools/bench.py eval --procs 1 2 --threads-total 2 --json eval.json
  finetune SLF / AFF step images/s on the shared training loop (Trainer.train_step), one process, from a tiny
           AdvCL encoder pretrained on the fly (cached under --cache); data loading not timed:
           python tools/bench.py finetune --modes slf aff --batch 128 --steps 20 --json finetune.json
  views    the views of an AdvCL step alone (crop/flip, two SimCLR views, x_h): images/s and the operators
           dispatched per batch (torch profiler), per batch size:
           python tools/bench.py views --batch 32 512 --size 32 --json views.json
  precision bf16 autocast vs fp32 for the attacks: the loss gain of δ and δ_ce on the same weights and batch,
           and the RA under PGD-20 of one classifier:
           python tools/bench.py precision --device cuda --json precision.json
  scaling  the communication of data-parallel AdvCL training (gradient all-reduce, embedding all-gather)
           measured on 1..N gloo processes against the model of docs/scaling.md:
           python tools/bench.py scaling --procs 1 2 3 --json scaling.json
"""
import argparse
import os
import sys

from advcl_dist.bench import evaluation, finetuning, kmeans, loader, method_step, precision, scaling, step, views


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    km = sub.add_parser("kmeans", help="distributed ensemble k-means vs scikit-learn KMeans")
    km.add_argument("--rows", type=int, default=1_000_000)
    km.add_argument("--dim", type=int, default=128)
    km.add_argument("--centres", type=int, default=1000, help="Gaussian blobs the synthetic features come from")
    km.add_argument("--ks", type=int, nargs="+", default=[2, 10, 50, 100, 500])
    km.add_argument("--iters", type=int, default=20)
    km.add_argument("--seed", type=int, default=0)
    km.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to time ours with")
    km.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    km.add_argument("--no-sklearn", dest="sklearn", action="store_false", help="skip the scikit-learn run")
    km.add_argument("--no-faiss", dest="faiss", action="store_false", help="skip the faiss.Kmeans run")
    km.add_argument("--json", help="also write the JSON report to this file")
    km.add_argument("--cache", default=".cache/bench", help="where the generated data are kept")
    ld = sub.add_parser("loader", help="FFCV vs torchvision DataLoader images/s, views on the device included")
    ld.add_argument("--format", choices=loader.FORMATS, help="the path to time (default: both, and their ratio)")
    ld.add_argument("--images", type=int, default=20_000, help="images generated (and timed, once per epoch)")
    ld.add_argument("--epochs", type=float, default=1, help="timed passes over the images (rounded up to a batch)")
    ld.add_argument("--size", type=int, default=32, help="image side in pixels (<= 96: in memory / raw, "
                    "else JPEG files / JPEG .beton)")
    ld.add_argument("--batch-size", type=int, help="default 512 up to 96 px, else 64")
    ld.add_argument("--workers", type=int, default=2, help="DataLoader processes / FFCV threads")
    ld.add_argument("--warmup", type=int, default=8, help="batches run before the clock starts")
    ld.add_argument("--no-views", dest="views", action="store_false",
                    help="time decode and transfer only (what the CPU does when a GPU makes the views)")
    ld.add_argument("--seed", type=int, default=0)
    ld.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ld.add_argument("--cache", default=".cache/bench", help="where the generated data are kept")
    st = sub.add_parser("step", help="one AdvCL training step: reference vs ours (fp32, bf16, compile) vs supervised")
    st.add_argument("--arch", choices=["resnet18", "resnet50"], default="resnet18")
    st.add_argument("--width", type=int, default=64, help="first-stage channels of the CIFAR ResNet")
    st.add_argument("--size", type=int, default=32, help="image and view side in pixels")
    st.add_argument("--batch", type=_batch, default=512,
                    help="images per step, or auto (CUDA): the largest power of two <= 1024 that fits")
    st.add_argument("--modes", nargs="+", choices=step.MODES, help="default: all of them")
    st.add_argument("--method", nargs="+", metavar="M",
                    help="instead of the AdvCL modes: one training step of each method or variant (or 'all'): "
                         "images/s, FLOPs/image, forward-equivalents per image")
    st.add_argument("--compile", action="store_true", help="also time bf16 with the model in torch.compile")
    st.add_argument("--attack-steps", type=int, default=5, help="PGD steps of each of the two attacks")
    st.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    st.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    st.add_argument("--json", help="also write the JSON report to this file")
    st.add_argument("--profile", metavar="DIR", help="also profile each mode (torch.profiler): a trace and an op "
                    "table per mode in DIR, the share of time per kind of operation in the report")
    ev = sub.add_parser("eval", help="sharded evaluation (PGD, AutoAttack) images/s on 1 vs N processes")
    ev.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (gloo ranks)")
    ev.add_argument("--threads-total", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads of all processes together, split evenly (default: every core)")
    ev.add_argument("--width", type=int, default=16, help="first-stage channels of the CIFAR ResNet-18")
    ev.add_argument("--train-steps", type=int, default=100,
                    help="plain cross-entropy steps (batch 128) training the classifier before it is attacked")
    ev.add_argument("--images", type=int, help="PGD on the first this many digits test images (default: all 360)")
    ev.add_argument("--aa-images", type=int, default=40, help="AutoAttack on the first this many")
    ev.add_argument("--batch", type=int, default=60, help="evaluation block (eval.batch_size) of PGD")
    ev.add_argument("--aa-batch", type=int, default=20, help="evaluation block of AutoAttack (0: --batch); the "
                    "default splits the 40 images into 2 blocks, so that 2 processes both have AutoAttack work")
    ev.add_argument("--pgd-steps", type=int, default=20, help="as attack.eval_steps")
    ev.add_argument("--eps", type=float, help="L∞ radius (default: attack.eps, 8/255)")
    ev.add_argument("--step-size", type=float, help="PGD step (default: attack.step_size, 2/255)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--cache", default=".cache/bench", help="where the trained classifier is kept")
    ev.add_argument("--json", help="also write the JSON report to this file")
    ft = sub.add_parser("finetune", help="SLF / AFF step images/s on the shared training loop")
    ft.add_argument("--modes", nargs="+", choices=finetuning.FT_MODES, default=["slf", "aff"])
    ft.add_argument("--width", type=int, default=16, help="first-stage channels of the pretrained ResNet-18")
    ft.add_argument("--batch", type=int, default=128, help="finetune.batch_size")
    ft.add_argument("--attack-steps", type=int, default=10, help="attack.supervised_steps (PGD inside ALF / AFF)")
    ft.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    ft.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ft.add_argument("--threads", type=int, help="torch threads (default: every core)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--cache", default=".cache/bench", help="where the pretrained encoder is kept")
    ft.add_argument("--json", help="also write the JSON report to this file")
    vw = sub.add_parser("views", help="the views of an AdvCL step alone: images/s and operators per batch")
    vw.add_argument("--batch", type=int, nargs="+", default=[32, 512], help="batch sizes to time")
    vw.add_argument("--size", type=int, default=32, help="image and view side in pixels")
    vw.add_argument("--steps", type=int, default=20, help="timed batches per batch size")
    vw.add_argument("--warmup", type=int, default=3, help="untimed batches before them")
    vw.add_argument("--threads", type=int, help="torch threads (default: every core)")
    vw.add_argument("--seed", type=int, default=0)
    vw.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    vw.add_argument("--json", help="also write the JSON report to this file")
    pr = sub.add_parser("precision", help="bf16 autocast vs fp32 for the attacks (loss gains, PGD-20 RA)")
    pr.add_argument("--width", type=int, default=16, help="first-stage channels of the CIFAR ResNet-18")
    pr.add_argument("--size", type=int, default=32, help="image side in pixels")
    pr.add_argument("--batch", type=int, default=256, help="images of the batch the attacks are compared on")
    pr.add_argument("--train-steps", type=int, default=100, help="steps training the classifier attacked")
    pr.add_argument("--images", type=int, default=1000, help="test images of the PGD-20 RA comparison")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    pr.add_argument("--cache", default=".cache/bench", help="where the trained models are kept")
    pr.add_argument("--json", help="also write the JSON report to this file")
    sc = sub.add_parser("scaling", help="data-parallel communication on 1..N gloo processes vs the scaling model")
    sc.add_argument("--procs", type=int, nargs="+", default=[1, 2, 3], help="process counts (gloo ranks)")
    sc.add_argument("--width", type=int, default=64, help="first-stage channels of the CIFAR ResNet-18")
    sc.add_argument("--batch", type=int, default=512, help="global batch of the embedding all-gather")
    sc.add_argument("--repeats", type=int, default=10, help="timed repetitions of each collective")
    sc.add_argument("--json", help="also write the JSON report to this file")
    return p


def _batch(value: str):
    return value if value == "auto" else int(value)


if __name__ == "__main__":
    args = parser().parse_args()
    mains = {"kmeans": kmeans.main, "loader": loader.main, "eval": evaluation.eval_main,
             "step": lambda a: (method_step.main(a) if a.method else step.main(a)),
             "finetune": finetuning.finetune_main, "views": views.main, "precision": precision.main,
             "scaling": scaling.main}
    sys.exit(mains[args.bench](args) and 0)
