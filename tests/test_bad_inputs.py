"""Bad inputs through the real CLIs: each ends in exit status 2 and one `error:` line that names the key or file
and the fix, with no traceback and no file written before it changed.

`CASES` is the table behind docs/reliability.md (one row per case id: `python tests/test_bad_inputs.py` prints
it as markdown). Each case builds what it needs in its own folder (and may read the module's shared runs: a tiny
pretraining run and a tiny classifier finetuned from it), runs `tools/<tool>.py` in this process (`runpy`, as
`python tools/<tool>.py ...` runs it) and checks:
- exit status 2 (argparse's own errors exit 2 too, their last line `<prog>: error: ...` after the usage);
- stderr's last non-empty line is one `error:` line matching the case's pattern (the key or file, the fix);
- no `Traceback` on stdout or stderr;
- every file under the case's folder and the shared folder keeps its bytes (`.lock` aside: it records its
  latest holder), and no file appears but a `.lock` (or, for the pipeline, its status records).
The security cases give every CLI that reads a checkpoint a file whose unpickling creates a marker file: it
must be refused by name, and the marker must not exist afterwards.
"""
from __future__ import annotations

import pickle
import re
import runpy
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from unsafe_files import Payload

from advcl_dist.config import load_config
from advcl_dist.engine import pretrain
from advcl_dist.finetune import finetune
from dataset_files import truncate, write_image_classes

pytestmark = pytest.mark.integration  # every case runs a whole tool

ROOT = Path(__file__).resolve().parents[1]
# 1437 digits in 2 steps of 512: pretraining + SLF + PGD-1 evaluation take seconds on one thread.
TINY = ["data.name=digits", "data.workers=0", "model.width=4", "model.proj_dim=16", "train.device=cpu",
        "train.batch_size=512", "train.epochs=1", "optim.warmup_epochs=0", "attack.steps=1"]
FT = ["finetune.epochs=1", "finetune.batch_size=512", "attack.supervised_steps=1", "attack.eval_steps=1",
      "eval.autoattack=false", "eval.batch_size=360"]
DIGITS_TRAIN = 1437
MARKER = "pwned"  # the file a payload's unpickling creates, in the case's folder
REFUSED = r"was refused: it holds a Python object \(\S+\) beyond tensors"
LOCK = r"(^|/)\.lock$"


# -- shared runs -------------------------------------------------------------------------------------
@dataclass
class Shared:
    root: Path
    pretrained: Path  # a finished AdvCL pretraining run folder (checkpoint.pt, run.json, config.yaml, ...)
    finetuned: Path  # an SLF run of it (classifier.pt, results.json, ...)

    @property
    def checkpoint(self) -> Path:
        return self.pretrained / "checkpoint.pt"

    @property
    def classifier(self) -> Path:
        return self.finetuned / "classifier.pt"


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("shared")
    pretrained, finetuned = root / "advcl", root / "advcl-slf"
    with one_thread():
        pretrain(load_config(None, [f"out_dir={pretrained}", *TINY]))
        finetune(load_config(None, [f"out_dir={finetuned}", *TINY, *FT, "finetune.mode=slf",
                                    f"finetune.checkpoint={pretrained / 'checkpoint.pt'}"]))
    return Shared(root, pretrained, finetuned)


class one_thread:
    """Tiny models run fastest on one thread on a small shared machine."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


# -- what the cases build ----------------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def payload(tmp: Path, name: str = "payload.pt") -> Path:
    path = folder((tmp / name).parent) / Path(name).name
    with open(path, "wb") as f:
        torch.save({"model": {}, "config": "", "x": Payload(tmp / MARKER)}, f)
    return path


def truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def npy(path: Path, array: np.ndarray, allow_pickle: bool = False) -> Path:
    np.save(path, array, allow_pickle=allow_pickle)
    return path


def copy_run(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock")))


def labels(tmp: Path, shape=(DIGITS_TRAIN, 5), dtype=np.int64, high: int = 2) -> Path:
    """Pseudo-labels for the digits training images and the default 5 Ks (K=2 first)."""
    return npy(tmp / "labels.npy", np.random.default_rng(0).integers(0, high, size=shape).astype(dtype))


def authors_pickle(tmp: Path, n: int) -> Path:
    """The authors' pseudo-label format (a pickled dict of label arrays per K), with `n` labels per K."""
    path = tmp / "labels.pkl"
    with open(path, "wb") as f:
        pickle.dump({f"pseudo_train_{k}": np.random.default_rng(k).integers(0, k, n) for k in (2, 10)}, f)
    return path


def object_labels(tmp: Path) -> Path:
    """A pickled object array (np.save with allow_pickle) holding a payload."""
    array = np.zeros((DIGITS_TRAIN, 5), dtype=object)
    array[0, 0] = Payload(tmp / MARKER)
    return npy(tmp / "labels.npy", array, allow_pickle=True)


# -- the table -------------------------------------------------------------------------------------
Argv = Callable[[Path, Shared], list]


@dataclass
class Case:
    tool: str
    what: str  # the bad input, for the docs table
    argv: Argv  # (case folder, shared runs) → the tool's arguments
    pattern: str  # re.search on the last stderr line
    argparse: bool = False  # argparse's own error: `<prog>: error: ...`
    may_create: str = LOCK  # files (relative paths) that may appear: a lock, or a stage's status records


def case(case_id: str, tool: str, what: str, argv: Argv, pattern: str, **kw):
    return pytest.param(Case(tool, what, argv, pattern, **kw), id=case_id)


def pretrain_args(*overrides) -> Argv:
    """tools/pretrain.py on the tiny settings, out_dir in the case's folder."""
    return lambda tmp, s: [f"out_dir={tmp / 'out'}", *TINY, *overrides]


def config(case_id: str, override: str, pattern: str, **kw):
    """A bad `key=value` through tools/pretrain.py."""
    return case(case_id, "pretrain", override, pretrain_args(override), pattern, **kw)


def preset(case_id: str, what: str, text: str | None, pattern: str):
    """A bad `--config FILE` (text None: no file)."""
    def argv(tmp, s):
        path = tmp / "preset.yaml" if text is None else write(tmp / "preset.yaml", text)
        return ["--config", path, f"out_dir={tmp / 'out'}", *TINY]
    return case(case_id, "pretrain", what, argv, pattern)


def data_root(case_id: str, name: str, what: str, make: Callable[[Path], Path], pattern: str):
    return case(case_id, "pretrain", what,
                lambda tmp, s: [f"out_dir={tmp / 'out'}", *TINY, f"data.name={name}", f"data.root={make(tmp)}"],
                pattern)


def corrupt_imagefolder(tmp: Path) -> Path:
    """A class-by-class ImageFolder whose last image was cut short by an interrupted copy."""
    paths = write_image_classes(tmp / "im" / "train", {"cat": [(16, 16)] * 2, "dog": [(16, 16)] * 2})
    truncate(paths[-1])
    return tmp / "im"


def mixed_imagefolder(tmp: Path) -> Path:
    write_image_classes(tmp / "im" / "train", {"cat": [(16, 16)] * 2, "dog": [(16, 16), (14, 10)]})
    return tmp / "im"


REDO = r"cluster this dataset again with the same pseudo\.ks"


def pseudo_labels(case_id: str, what: str, make: Callable[[Path], Path], pattern: str):
    """tools/pretrain.py train.method=advcl pseudo.labels=<bad file>."""
    return case(case_id, "pretrain", what, lambda tmp, s: [f"out_dir={tmp / 'out'}", *TINY, "train.method=advcl",
                                                           f"pseudo.labels={make(tmp)}"], pattern)


def finetune_from(case_id: str, what: str, checkpoint: Argv, pattern: str, *extra: str, **kw):
    """tools/finetune.py finetune.checkpoint=<file> [extra overrides]."""
    return case(case_id, "finetune", what, lambda tmp, s: [f"out_dir={tmp / 'out'}", *TINY, *FT, "finetune.mode=slf",
                                                           f"finetune.checkpoint={checkpoint(tmp, s)}", *extra],
                pattern, **kw)


def cluster_from(case_id: str, what: str, fpre: Argv, pattern: str):
    """tools/cluster.py pseudo.fpre=<file>."""
    return case(case_id, "cluster", what, lambda tmp, s: [f"out_dir={tmp / 'out'}", *TINY, "pseudo.ks=[2,3]",
                                                          "pseudo.iters=2", f"pseudo.fpre={fpre(tmp, s)}"], pattern)


def evaluate(case_id: str, what: str, checkpoint: Argv, pattern: str, extra: Callable[[Path], list] = lambda tmp: []):
    """tools/evaluate.py eval.checkpoint=<file> [extra overrides, made in the case's folder]."""
    return case(case_id, "evaluate", what, lambda tmp, s: [f"out_dir={tmp / 'out'}", *TINY, *FT,
                                                           f"eval.checkpoint={checkpoint(tmp, s)}", *extra(tmp)],
                pattern)


def resume_with(case_id: str, change: str, key: str):
    """tools/pretrain.py resuming a copy of the shared run with a shape-defining key changed."""
    def argv(tmp, s):
        return [f"out_dir={copy_run(s.pretrained, tmp / 'run')}", *TINY, change]
    return case(case_id, "pretrain", f"resume a finished run with {change}", argv,
                rf"\S*run/checkpoint\.pt belongs to another run \({re.escape(key)}: .*Use another out_dir, or "
                r"restore")


def submit(case_id: str, what: str, args: Argv, pattern: str, **kw):
    """tools/submit.py --cluster local --dry-run ..."""
    return case(case_id, "submit", what, lambda tmp, s: ["--cluster", "local", "--dry-run", "--output",
                                                         tmp / "sub", *args(tmp, s)], pattern, **kw)



CASES = [
    # --- keys and values (tools/pretrain.py key=value) ---
    config("unknown-key", "train.epoch=3",
           r"unknown config key 'train\.epoch'.*valid keys under 'train': .*epochs"),
    config("moved-key", "loss.pseudo_weight=1", r"'loss\.pseudo_weight'.* is now 'advcl\.pseudo_weight'.*rename it"),
    config("override-without-value", "train.epochs", r"override 'train\.epochs' is not of the form key=value"),
    config("wrong-type", "train.epochs=abc", r"'train\.epochs'.*'abc'.*Integer; give a value of the key's type"),
    config("negative-momentum", "optim.momentum=-5", r"'optim\.momentum': must be in \[0, 1\)"),
    config("probability-over-1", "views.jitter_p=7", r"'views\.jitter_p'.*probability: must be in \[0, 1\]"),
    config("zero-base-temperature", "loss.base_temperature=0",
           r"'loss\.base_temperature': must be > 0, or null to leave the loss unscaled"),
    config("infinite-lr", "optim.lr=.inf", r"'optim\.lr': inf is not a finite number; give a finite value"),
    finetune_from("unknown-bn-branch", "finetune.bn_branch=bogus", lambda tmp, s: s.checkpoint,
                  r"'finetune\.bn_branch': 'bogus' is not one of \['normal', 'pgd'", "finetune.bn_branch=bogus"),
    config("unknown-split", "data.split=banana", r"'data\.split': 'banana' is not a split of digits: \[.*'train'"),
    config("empty-ks", "pseudo.ks=[]", r"'pseudo\.ks': must list at least one K \(e\.g\."),
    config("too-many-workers", "data.workers=1000", r"'data\.workers': must be in \[0, 128\]"),
    config("missing-plugin-file", "train.plugins=[missing_plugin.py]",
           r"'train\.plugins': file missing_plugin\.py does not exist; give the path of a \.py file"),
    # --- methods (issue 21) ---
    config("unknown-method", "train.method=acll", r"'train\.method': 'acll' is not one of \[.*'acl'"),
    config("unknown-baseline", "pipeline.baselines=[dynacl+++]",
           r"'pipeline\.baselines': 'dynacl\+\+\+' is not a registered method \(.*\) or variant \(.*'dynacl\+\+'"),
    config("variant-as-method", "train.method=dynacl++",
           r"'train\.method': 'dynacl\+\+' is a variant, not a method: run it as train\.method=dynacl "
           r"dynacl\.post=True, or list it in pipeline\.baselines"),
    config("option-of-another-method", "acl.variant=a2a",
           r"'acl\.variant': is an option of method acl, which this run does not train .*set train\.method=acl"),
    case("unknown-acl-variant", "pretrain", "train.method=acl acl.variant=a3a", pretrain_args("train.method=acl",
                                                                                            "acl.variant=a3a"),
         r"'acl\.variant': 'a3a' is not one of"),
    case("pseudo-pickle-wrong-length", "import_pseudo_labels", "the authors' pickle, 100 labels for 1437 digits",
         lambda tmp, s: [authors_pickle(tmp, 100), f"out_dir={tmp / 'out'}", *TINY, "pseudo.ks=[2]"],
         r"\S*labels\.pkl: 'pseudo_train_2' has 100 labels but digits/train .* has 1437 images.*set data\.name"),
    case("results-as-fpre", "cluster", "pseudo.fpre=results.json",
         lambda tmp, s: [f"out_dir={tmp / 'out'}", *TINY, "pseudo.ks=[2,3]",
                         f"pseudo.fpre={s.finetuned / 'results.json'}"],
         r"pseudo\.fpre must be a pretraining checkpoint\.pt of this package"),
    # --- presets (--config FILE) ---
    preset("malformed-yaml-preset", "--config with a YAML syntax error", "train: {epochs: [1,\n",
           r"config file \S*preset\.yaml is not valid YAML at line \d+.*fix it there"),
    preset("list-yaml-preset", "--config holding a YAML list", "- train.epochs=1\n",
           r"config file \S*preset\.yaml holds a list, not a mapping.*write it as sections"),
    preset("missing-preset", "--config naming no file", None,
           r"config file \S*preset\.yaml does not exist; presets live in configs/"),
    preset("unknown-key-in-preset", "--config with a misspelt key", "optim:\n  lrr: 1\n",
           r"unknown config key 'optim\.lrr' in config file \S*preset\.yaml; valid keys under 'optim': .*lr"),
    # --- data folders ---
    data_root("missing-data-root", "cifar10", "data.root=<no such folder>", lambda tmp: tmp / "no-data",
              r"CIFAR-10 not found: \S*no-data\S* does not exist\. Set data\.root .*data\.download=true"),
    data_root("imagefolder-without-train", "imagefolder", "data.root=<empty folder>", lambda tmp: folder(tmp / "im"),
              r"ImageFolder not found: \S*im/train does not exist\. Set data\.root to the folder that contains train/"),
    data_root("imagefolder-empty-train", "imagefolder", "data.root=<folder with an empty train/>",
              lambda tmp: folder(tmp / "im" / "train").parent,
              r"ImageFolder has no images under \S*im/train.*Set data\.root"),
    case("imagefolder-corrupt-image", "pretrain", "data.scan=true, one truncated PNG",
         lambda tmp, s: [f"out_dir={tmp / 'out'}", *TINY, "data.name=imagefolder", "data.scan=true",
                         f"data.root={corrupt_imagefolder(tmp)}"],
         r"data\.scan: 1 of 4 images under \S*train cannot be trained on: \S*dog/1\.png is unreadable.*Replace or "
         r"remove"),
    case("imagefolder-mixed-sizes", "pretrain", "data.scan=true, images of two sizes, no data.image_size",
         lambda tmp, s: [f"out_dir={tmp / 'out'}", *TINY, "data.name=imagefolder", "data.scan=true",
                         f"data.root={mixed_imagefolder(tmp)}"],
         r"data\.scan: .*\S*dog/1\.png is 10×14.*data\.image_size="),
    # --- pseudo-labels (tools/pretrain.py train.method=advcl pseudo.labels=FILE) ---
    pseudo_labels("pseudo-labels-wrong-shape", "pseudo.labels=<[100, 5] array>",
                  lambda tmp: labels(tmp, shape=(100, 5)),
                  rf"pseudo\.labels \S*labels\.npy: shape \(100, 5\), expected \({DIGITS_TRAIN}, 5\).*{REDO}"),
    pseudo_labels("pseudo-labels-float", "pseudo.labels=<float32 array>", lambda tmp: labels(tmp, dtype=np.float32),
                  rf"pseudo\.labels \S*labels\.npy: dtype float32, expected integers.*{REDO}"),
    pseudo_labels("pseudo-labels-out-of-range", "pseudo.labels=<labels >= K>", lambda tmp: labels(tmp, high=1000),
                  rf"pseudo\.labels \S*labels\.npy: column 0 \(K=2\) has labels outside \[-1, 1\].*{REDO}"),
    pseudo_labels("pseudo-labels-pickled", "pseudo.labels=<pickled object array>", object_labels,
                  r"pseudo\.labels \S*labels\.npy is not a readable \.npy array.*Object arrays.*write it with"),
    pseudo_labels("pseudo-labels-missing", "pseudo.labels=<no such file>", lambda tmp: tmp / "none.npy",
                  r"'pseudo\.labels': file \S*none\.npy does not exist; run the clustering stage"),
    # --- checkpoints ---
    finetune_from("truncated-checkpoint", "finetune.checkpoint=<half a checkpoint.pt>",
                  lambda tmp, s: truncated(s.checkpoint, tmp / "cut.pt"),
                  r"\S*cut\.pt cannot be read as a torch checkpoint.*damaged or not a checkpoint: point at another"),
    finetune_from("text-file-as-checkpoint", "finetune.checkpoint=<a text file>",
                  lambda tmp, s: write(tmp / "notes.txt", "not a checkpoint\n"),
                  r"\S*notes\.txt cannot be read as a torch checkpoint.*not a checkpoint"),
    finetune_from("numpy-file-as-checkpoint", "finetune.checkpoint=<a .npy file>",
                  lambda tmp, s: npy(tmp / "array.npy", np.zeros((3, 3))),
                  r"\S*array\.npy cannot be read as a torch checkpoint.*not a checkpoint"),
    finetune_from("missing-checkpoint", "finetune.checkpoint=<no such file>", lambda tmp, s: tmp / "none.pt",
                  r"\S*none\.pt does not exist; pretrain first"),
    finetune_from("classifier-as-checkpoint", "finetune.checkpoint=classifier.pt", lambda tmp, s: s.classifier,
                  r"\S*classifier\.pt is a finetuned classifier, not a pretraining checkpoint; point at the "
                  r"checkpoint\.pt"),
    cluster_from("classifier-as-fpre", "pseudo.fpre=classifier.pt", lambda tmp, s: s.classifier,
                 r"pseudo\.fpre=\S*classifier\.pt is a finetuned classifier \(classifier\.pt\), not a pretraining "
                 r"checkpoint; pseudo\.fpre must be a pretraining checkpoint\.pt"),
    evaluate("checkpoint-as-classifier", "eval.checkpoint=checkpoint.pt", lambda tmp, s: s.checkpoint,
             r"\S*checkpoint\.pt is not a finetuned classifier.*tools/finetune\.py finetune\.checkpoint="),
    evaluate("truncated-classifier", "eval.checkpoint=<half a classifier.pt>",
             lambda tmp, s: truncated(s.classifier, tmp / "cut.pt"),
             r"\S*cut\.pt cannot be read as a torch checkpoint.*point at another file"),
    evaluate("aa-indices-out-of-range", "eval.aa_indices=<a list for a larger test set>", lambda tmp, s: s.classifier,
             r"eval\.aa_indices file \S*ids\.txt: index 400 is outside the test set \(0 … 359\); the file is for "
             r"another dataset or split",
             lambda tmp: ["eval.autoattack=true", "eval.aa_indices=" + str(write(tmp / "ids.txt", "3\n400\n"))]),
    evaluate("aa-indices-missing", "eval.aa_indices=<no such file>", lambda tmp, s: s.classifier,
             r"config key 'eval\.aa_indices': file \S*none\.txt does not exist; give a file of test-image indices",
             lambda tmp: ["eval.autoattack=true", f"eval.aa_indices={tmp / 'none.txt'}"]),
    # --- resuming with a changed shape-defining key ---
    resume_with("resume-changed-batch-size", "train.batch_size=256", "train.batch_size"),
    resume_with("resume-changed-width", "model.width=8", "model.width"),
    resume_with("resume-changed-method", "train.method=simclr", "train.method"),
    # --- output paths ---
    case("out-dir-is-a-file", "pretrain", "out_dir=<a file>",
         lambda tmp, s: [f"out_dir={write(tmp / 'taken', 'a file')}", *TINY],
         r"out_dir \S*taken is a file, not a folder; choose another out_dir"),
    case("write-ffcv-out-is-folder", "write_ffcv", "--out <a folder>",
         lambda tmp, s: ["--dataset", "digits", "--split", "train", "--out", folder(tmp / "betons")],
         r"--out \S*betons is a folder; give the path of the \.beton file to write in it, e\.g\. --out"),
    # --- tools/submit.py --cluster local --dry-run ---
    submit("submit-zero-nodes", "--nodes 0", lambda tmp, s: ["--nodes", "0"], r"--nodes must be >= 1"),
    submit("submit-unknown-stage", "--stage bogus", lambda tmp, s: ["--stage", "bogus"],
           r"argument --stage: invalid choice: 'bogus' \(choose from", argparse=True),
    submit("submit-stage-without-input", "--stage finetune, no finetune.checkpoint",
           lambda tmp, s: ["--stage", "finetune", "--config", "configs/demo.yaml"],
           r"--stage finetune needs finetune\.checkpoint=PATH"),
    submit("submit-missing-sweep", "--sweep <no such file>", lambda tmp, s: ["--sweep", tmp / "no.yaml"],
           r"sweep file \S*no\.yaml does not exist; sweeps live in configs/sweeps/"),
    submit("submit-sweep-is-a-list", "--sweep <a YAML list>",
           lambda tmp, s: ["--sweep", write(tmp / "sweep.yaml", "- a\n- b\n")],
           r"sweep file \S*sweep\.yaml holds a list, not a mapping; write it as in configs/sweeps/, e\.g\. grid:"),
    submit("submit-sweep-malformed", "--sweep <a YAML syntax error>",
           lambda tmp, s: ["--sweep", write(tmp / "sweep.yaml", "grid: {a: [1,\n")],
           r"sweep file \S*sweep\.yaml is not valid YAML at line \d+.*fix it there"),
    submit("submit-sweep-empty-grid", "--sweep <grid: {}>", lambda tmp, s: ["--sweep", write(tmp / "sweep.yaml",
                                                                                             "grid: {}\n")],
           r"sweep file \S*sweep\.yaml: 'grid' must map dotted keys to non-empty lists of values, e\.g\."),
    # --- tools/report.py, tools/export.py ---
    case("report-corrupt-results", "report", "DIR with a cut-short results.json",
         lambda tmp, s: [write(tmp / "runs" / "a" / "results.json", '{"SA": 1,').parents[1]],
         r"\S*results\.json is not valid JSON.*move it away, or re-run the finetuning/evaluation"),
    case("report-missing-folder", "report", "DIR that does not exist", lambda tmp, s: [tmp / "nowhere"],
         r"\S*nowhere is not a folder; give the run or sweep folder"),
    case("export-missing-folder", "export", "RUN_DIR that does not exist", lambda tmp, s: [tmp / "nowhere"],
         r"run folder \S*nowhere does not exist; pass the out_dir of a finetuning run"),
    case("export-pretraining-run", "export", "a pretraining RUN_DIR without --encoder-only",
         lambda tmp, s: [copy_run(s.pretrained, tmp / "run")],
         r"\S*run is a pretraining run .*no classifier\.pt.*finetune it first.*or pass --encoder-only"),
]

# --- a pickle payload as the checkpoint of every CLI that reads one ---
SECURITY = [
    finetune_from("payload-finetune", "finetune.checkpoint=<pickle payload>", lambda tmp, s: payload(tmp),
                  rf"\S*payload\.pt {REFUSED}"),
    cluster_from("payload-cluster", "pseudo.fpre=<pickle payload>", lambda tmp, s: payload(tmp),
                 rf"pseudo\.fpre: \S*payload\.pt {REFUSED}"),
    evaluate("payload-evaluate", "eval.checkpoint=<pickle payload>", lambda tmp, s: payload(tmp),
             rf"\S*payload\.pt {REFUSED}"),
    case("payload-pretrain-resume", "pretrain", "out_dir whose checkpoint.pt is a pickle payload",
         lambda tmp, s: [f"out_dir={payload(tmp, 'run/checkpoint.pt').parent}", *TINY],
         rf"\S*run/checkpoint\.pt {REFUSED}"),
    # the pipeline's first stage is the clustering of pseudo.fpre: no f_pre pretraining, no baselines
    case("payload-pipeline", "pipeline", "pseudo.fpre=<pickle payload>",
         lambda tmp, s: [f"out_dir={tmp / 'pipe'}", *TINY, "train.method=advcl", "pipeline.baselines=[]",
                         "pseudo.ks=[2,3]", f"pseudo.fpre={payload(tmp)}"],
         rf"pseudo\.fpre: \S*payload\.pt {REFUSED}", may_create=rf"{LOCK}|^pipe/(pipeline\.json|config\.yaml)$"),
    case("payload-export", "export", "RUN_DIR whose classifier.pt is a pickle payload",
         lambda tmp, s: [payload(tmp, "run/classifier.pt").parent], rf"\S*run/classifier\.pt {REFUSED}"),
]
CASES += SECURITY


# -- running a tool ----------------------------------------------------------------------------------
def snapshot(*folders: Path) -> dict[Path, bytes]:
    """The bytes of every file under the folders, `.lock` aside (it records its latest holder)."""
    return {p: p.read_bytes() for root in folders for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def run_tool(tool: str, argv: list[str], monkeypatch, capfd) -> tuple[int, str, str]:
    """`python tools/<tool>.py argv...` in this process: (exit status, stdout, stderr)."""
    script = ROOT / "tools" / f"{tool}.py"
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    capfd.readouterr()
    code = 0
    try:
        with one_thread():
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_error_line_and_changes_nothing(case: Case, shared, tmp_path, monkeypatch,
                                                                    capfd):
    monkeypatch.chdir(ROOT)  # `--config configs/...` as a user types it
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)  # one process, not a task of a launch
    tmp = folder(tmp_path / "case")
    argv = [str(a) for a in case.argv(tmp, shared)]
    before = snapshot(tmp, shared.root)
    code, out, err = run_tool(case.tool, argv, monkeypatch, capfd)
    shown = f"tools/{case.tool}.py {' '.join(argv)}\n--- exit {code}; stdout:\n{out}\n--- stderr:\n{err}"
    assert "Traceback" not in out + err, shown
    assert code == 2, shown
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, shown
    assert re.match(r"^\S+: error: " if case.argparse else r"^error: ", lines[-1]), shown
    assert re.search(case.pattern, lines[-1]), f"the error line does not match {case.pattern!r}:\n{shown}"
    after = snapshot(tmp, shared.root)
    changed = sorted(str(p) for p in before if after.get(p) != before[p])
    assert not changed, f"files written before the run changed or vanished: {changed}\n{shown}"
    created = [p for p in (str(q.relative_to(tmp)) for q in tmp.rglob("*") if q.is_file() and q not in before)
               if not re.search(case.may_create, p)]
    assert not created, f"the refused run wrote {created}\n{shown}"
    assert not (tmp / MARKER).exists(), f"the payload ran: {tmp / MARKER} exists\n{shown}"


def test_the_payload_is_live(tmp_path):
    """The security cases mean something only if the payload runs under a full unpickler."""
    torch.load(payload(tmp_path), weights_only=False)
    assert (tmp_path / MARKER).exists()
    pickle.loads(pickle.dumps(Payload(tmp_path / "again")))
    assert (tmp_path / "again").exists()


def test_every_checkpoint_reading_cli_has_a_payload_case():
    assert {p.values[0].tool for p in SECURITY} == {"finetune", "cluster", "evaluate", "pretrain", "pipeline",
                                                    "export"}


def test_the_table_has_35_cases_with_short_unique_ids():
    ids = [p.id for p in CASES]
    assert len(ids) >= 35 and len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) and len(i) <= 32 for i in ids), ids


def markdown_table() -> str:
    """The table as docs/reliability.md shows it: case, command, bad input, what the error line says."""
    rows = ["| case | command | bad input | the `error:` line matches |", "|---|---|---|---|"]
    for p in CASES:
        c = p.values[0]
        pattern = c.pattern.replace("|", r"\|")
        rows.append(f"| {p.id} | tools/{c.tool}.py | {c.what.replace('|', '/')} | `{pattern}` |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
