"""Weights others can load safely: a run's classifier and encoder as safetensors, described by export.json.

`classifier.pt` is a torch pickle: safe only through a loader restricted to tensors (ours is), and unsafe
through any other. An export holds tensors only (safetensors: a JSON header and raw bytes; reading it runs no
code, in any framework), in `RUN_DIR/export/`:
- classifier.safetensors: the served classifier under our own key names; its header says how to rebuild it,
  so `evaluate.load_classifier` takes this file (or the folder) as it takes classifier.pt;
- encoder.safetensors: the encoder alone, its served BN branch as a plain BatchNorm, under torchvision's key
  names (`layer1.0.bn1.weight`), for `plain_encoder(export.json)`, a torchvision ResNet with no branches;
- export.json: what rebuilding and judging them needs: architecture, BN branches, threat model, input range,
  results, the source's sha256 and the key mapping rule (`MAPPING_RULE`; other BN branches are dropped).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import torch
import yaml
from torch import nn

from .config import ConfigError
from .engine.checkpoint import load_checkpoint, load_encoder
from .eval_blocks import file_sha256
from .models import BACKBONES, Classifier
from .run_folder import atomic_write, read_json, write_json

FORMAT = "advcl_dist-export/1"
EXPORT_JSON, ENCODER, CLASSIFIER = "export.json", "encoder.safetensors", "classifier.safetensors"
HEADER = "advcl_dist"  # the safetensors metadata entry holding our JSON facts
MAPPING_RULE = ["classifier key 'encoder.K' -> K (the encoder alone; 'head.*' only in classifier.safetensors)",
                "'X.bns.<served branch>.P' -> 'X.P' (a plain BatchNorm); other BN branches are dropped",
                "CIFAR ResNets: 'layers.<i>.' -> 'layer<s>.<j>.' (block j of stage s; a stage starts where the "
                "channel count changes), then 'shortcut.' -> 'downsample.'",
                "ResNet-50: names are torchvision's already",
                "a key matching no torchvision name keeps ours, listed under 'unmapped'"]
TORCHVISION_KEY = re.compile(r"(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.\w+"
                             r"|downsample\.[01]\.\w+))")
RESULT_KEYS = ("dataset", "method", "finetune", "SA", "RA", "AA", "n_test", "intervals", "aa_subset", "attack",
               "epoch", "selected_by", "checkpoint")


def served_branch(branches, branch: str) -> str:
    """The BN branch a forward with `branch` uses: a one-branch model's only one, else `branch` itself."""
    if len(branches) == 1:
        return branches[0]
    if branch not in branches:
        raise ConfigError(f"BN branch {branch!r} is not one of this model's {list(branches)}; pass --branch with one")
    return branch


def block_positions(weights: dict) -> dict[int, tuple[int, int]]:
    """Our flat `layers.<i>` → (stage 1-4, index in it), read from the weights: a stage starts at a new width."""
    found = (re.fullmatch(r"layers\.(\d+)\.conv1\.weight", key) for key in weights)
    positions, stage, index, planes = {}, 0, 0, None
    for i in sorted(int(m.group(1)) for m in found if m):
        width = weights[f"layers.{i}.conv1.weight"].shape[0]
        stage, index = (stage + 1, 0) if width != planes else (stage, index + 1)
        positions[i], planes = (stage, index), width
    return positions


def plain_key(key: str, served: str, positions: dict[int, tuple[int, int]]) -> str | None:
    """Our encoder key under torchvision's name; None for another BN branch's entry (not exported)."""
    if ".bns." in key:
        module, rest = key.split(".bns.", 1)
        branch, param = rest.split(".", 1)
        if branch != served:
            return None
        key = f"{module}.{param}"
    block = re.fullmatch(r"layers\.(\d+)\.(.*)", key)
    if block and int(block.group(1)) in positions:
        stage, index = positions[int(block.group(1))]
        key = f"layer{stage}.{index}." + re.sub(r"^shortcut\.", "downsample.", block.group(2))
    return key


def plain_encoder_weights(weights: dict, branches, branch: str) -> tuple[dict, list[str]]:
    """The encoder's weights with the served BN branch as plain BN, torchvision-named; and the unmapped keys."""
    served, positions = served_branch(branches, branch), block_positions(weights)
    plain, unmapped = {}, []
    for key, tensor in weights.items():
        name = plain_key(key, served, positions)
        if name is not None and not TORCHVISION_KEY.fullmatch(name):
            name = key
            unmapped.append(key)
        if name is not None:
            plain[name] = tensor
    return plain, unmapped


def plain_network(plain: dict, unmapped: list[str]) -> dict | None:
    """The torchvision ResNet the plain weights fit, read from them; None when some key is not torchvision's."""
    if unmapped or "conv1.weight" not in plain:
        return None
    counts = Counter(m.group(1) for key in plain if (m := re.fullmatch(r"layer(\d)\.\d+\.conv1\.weight", key)))
    blocks = [counts[s] for s in sorted(counts)]
    block = "Bottleneck" if "layer1.0.conv3.weight" in plain else "BasicBlock"
    cifar = plain["conv1.weight"].shape[-1] == 3  # our CIFAR stem: 3×3, stride 1, no max-pool
    changes = ("conv1 = Conv2d(3, width, 3, 1, 1, bias=False), maxpool = Identity, layer<s> of width * 2^(s-1) "
               "channels, " if cifar else "") + "fc = Identity (the output is the pooled feature vector)"
    return {"torchvision": f"torchvision.models.resnet.ResNet({block}, {blocks})", "block": block, "blocks": blocks,
            "width": int(plain["conv1.weight"].shape[0]), "stem": "cifar" if cifar else "torchvision",
            "changes": changes, "build": "advcl_dist.export.plain_encoder(json.load(open('export.json')))"}


def basic_stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
    """A stage of torchvision BasicBlocks at any width (torchvision's own ResNet fixes the first at 64)."""
    from torchvision.models.resnet import BasicBlock

    blocks = []
    for j in range(n):
        step = stride if j == 0 else 1
        down = None if step == 1 and in_planes == planes else nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, step, bias=False), nn.BatchNorm2d(planes))
        blocks.append(BasicBlock(in_planes, planes, step, down))
        in_planes = planes
    return nn.Sequential(*blocks)


def plain_encoder(facts: dict) -> nn.Module:
    """The torchvision ResNet (no fc, eval mode) that encoder.safetensors loads into strictly, from export.json."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    net_facts = facts.get("plain_network")
    if net_facts is None:
        raise ConfigError("this export's encoder keys are not all torchvision's (export.json 'unmapped'); "
                          "load classifier.safetensors with advcl_dist.evaluate.load_classifier instead")
    blocks, width = net_facts["blocks"], net_facts["width"]
    net = ResNet(Bottleneck if net_facts["block"] == "Bottleneck" else BasicBlock, blocks)
    if net_facts["stem"] == "cifar":
        net.conv1, net.bn1, net.maxpool = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.Identity()
        for s, n in enumerate(blocks):
            setattr(net, f"layer{s + 1}", basic_stage(width * 2 ** max(s - 1, 0), width * 2**s, n, 1 if s == 0 else 2))
    net.fc = nn.Identity()
    return net.eval()


def safetensors_bytes(tensors: dict, header: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"format": "pt", HEADER: json.dumps(header)})


def read_safetensors(path: Path) -> tuple[dict, dict | None]:
    """Tensors and our header of a safetensors file; parsing the format runs no code."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = (f.metadata() or {}).get(HEADER)
            return {key: f.get_tensor(key) for key in f.keys()}, json.loads(header) if header else None
    except Exception as e:  # the library's own error type: a damaged or foreign file
        raise ConfigError(f"{path} cannot be read as safetensors ({' '.join(str(e).split())}); export it again "
                          "with tools/export.py") from None


def load_exported(path: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """The classifier of an export (classifier.safetensors or its folder), in eval mode, as load_classifier."""
    path = Path(path)
    if path.is_dir():
        if not (path / CLASSIFIER).is_file():
            raise ConfigError(f"{path} holds no {CLASSIFIER} (an encoder-only export); export a finetuning run "
                              "(tools/export.py RUN_DIR) to get a classifier")
        path = path / CLASSIFIER
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write it with tools/export.py RUN_DIR (a finetuning run)")
    tensors, header = read_safetensors(path)
    if not header or header.get("content") != "classifier":
        what = "an encoder alone: load it into advcl_dist.export.plain_encoder" if header else "not ours"
        raise ConfigError(f"{path} is not an exported classifier ({what}); pass the export's {CLASSIFIER}")
    if header["arch"] not in BACKBONES:
        raise ConfigError(f"{path}: architecture {header['arch']!r} is not known to this version of advcl_dist")
    model = Classifier(BACKBONES[header["arch"]](header["width"], tuple(header["branches"])),
                       header["num_classes"], header["branch"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ConfigError(f"{path}: its tensors do not fit the network its header describes "
                          f"({str(e).splitlines()[0]}); the file is damaged, export it again") from None
    return model.to(device).eval()


def threat_model(config_yaml: str) -> dict:
    attack = (yaml.safe_load(config_yaml) or {}).get("attack") or {}
    eps = attack.get("eps")
    return {"norm": "Linf", **attack, "eps_255": None if eps is None else round(eps * 255, 4)}


def input_facts(image_size: int) -> dict:
    return {"dtype": "float32", "layout": "NCHW", "channels": 3, "size": [image_size, image_size], "range": [0, 1],
            "normalisation": None, "note": "pixels / 255, no mean/std: the networks hold no normalisation layer; "
                                           "the threat model's eps is in these [0, 1] units"}


def results_summary(run_dir: Path) -> dict | None:
    results = read_json(run_dir / "results.json")
    return None if results is None else {"file": "results.json", **{k: results[k] for k in RESULT_KEYS
                                                                      if k in results}}


def check_free(out: Path, force: bool) -> None:
    taken = [name for name in (EXPORT_JSON, ENCODER, CLASSIFIER) if (out / name).exists()]
    if taken and not force:
        raise FileExistsError(f"{out} already holds {', '.join(taken)}; pass --force to overwrite, "
                              "or --out another folder")


def source_of(run_dir: Path, encoder_only: bool) -> Path:
    """The file to export from `run_dir`, or one error line saying what to pass instead."""
    if run_dir.is_file():
        hint = (" (a pretraining checkpoint: finetune it first, tools/finetune.py finetune.checkpoint="
                f"{run_dir}, or export its encoder with --encoder-only)" if run_dir.name == "checkpoint.pt" else "")
        raise ConfigError(f"{run_dir} is a file, not a run folder{hint}; pass its folder: tools/export.py "
                          f"{run_dir.parent}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; pass the out_dir of a finetuning run "
                                "(tools/finetune.py), which holds classifier.pt")
    if (run_dir / "classifier.pt").is_file():
        return run_dir / "classifier.pt"
    if (run_dir / "checkpoint.pt").is_file():
        if encoder_only:
            return run_dir / "checkpoint.pt"
        raise ConfigError(f"{run_dir} is a pretraining run ({run_dir / 'checkpoint.pt'}, no classifier.pt): "
                          f"finetune it first (tools/finetune.py finetune.checkpoint={run_dir / 'checkpoint.pt'}), "
                          "or pass --encoder-only to export its encoder alone")
    raise FileNotFoundError(f"{run_dir} holds neither classifier.pt nor checkpoint.pt; pass the out_dir of a "
                            "finetuning run (tools/finetune.py)")


def read_source(path: Path, branch: str | None) -> tuple[nn.Module | None, nn.Module, dict, dict]:
    """(classifier or None, encoder, model facts, checkpoint state) of a classifier.pt or a checkpoint.pt."""
    if path.name == "classifier.pt":
        from .evaluate import _read_classifier  # the same weight selection (best or last epoch) as load_classifier

        model, state = _read_classifier(path, "cpu")
        meta = state["classifier"]
        if branch not in (None, meta["branch"]):
            raise ConfigError(f"{path} serves BN branch {meta['branch']!r}; --branch only applies to a pretraining "
                              "run's encoder (--encoder-only)")
        facts = {**meta, "served_branch": served_branch(meta["branches"], meta["branch"]),
                 "feat_dim": model.head.in_features}
        return model, model.encoder, facts, state
    state = load_checkpoint(path)
    encoder, info = load_encoder(path, "cpu", state)
    config = yaml.safe_load(state["config"])
    branch = branch or "pgd"  # finetune.bn_branch's default, the authors' choice
    facts = {"arch": info["arch"], "width": info["width"], "branches": info["branches"], "branch": branch,
             "served_branch": served_branch(info["branches"], branch), "feat_dim": encoder.feat_dim,
             "image_size": config["views"]["size"], "dataset": config["data"]["name"], "method": info["method"]}
    return None, encoder, facts, state


def export_run(run_dir: str | Path, out: str | Path | None = None, force: bool = False, encoder_only: bool = False,
               branch: str | None = None) -> Path:
    """Write the export of `run_dir` into `out` (default RUN_DIR/export); returns the export.json path."""
    run_dir = Path(run_dir)
    source = source_of(run_dir, encoder_only)
    out = Path(out) if out else run_dir / "export"
    check_free(out, force)
    classifier, encoder, facts, state = read_source(source, branch)
    plain, unmapped = plain_encoder_weights(encoder.state_dict(), facts["branches"], facts["branch"])
    layout = "torchvision, but for the keys in export.json's 'unmapped'" if unmapped else "torchvision"
    (out / EXPORT_JSON).unlink(missing_ok=True)  # (--force) no export.json beside half-rewritten files
    headers = {ENCODER: {"content": "encoder", "layout": layout, **facts}}
    tensors = {ENCODER: plain}
    if classifier is not None and not encoder_only:
        headers[CLASSIFIER], tensors[CLASSIFIER] = {"content": "classifier", **facts}, classifier.state_dict()
    files = {}
    for name, weights in tensors.items():
        data = safetensors_bytes(weights, headers[name])
        atomic_write(out / name, lambda f, data=data: f.write(data))
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "tensors": len(weights)}
    if CLASSIFIER not in files:
        (out / CLASSIFIER).unlink(missing_ok=True)  # --force over an older full export: no stale classifier
    removed = sorted(b for b in facts["branches"] if b != facts["served_branch"])
    description = {
        "format": FORMAT, "kind": "classifier" if CLASSIFIER in files else "encoder", "model": facts,
        "input": input_facts(facts["image_size"]), "threat_model": threat_model(state["config"]),
        "results": results_summary(run_dir),
        "source": {"file": str(source.resolve()), "sha256": file_sha256(source), "step": state.get("step"),
                   "finished": bool(state.get("finished")), "selected": state.get("selected")},
        "files": files,
        "encoder_keys": {"layout": layout, "rule": MAPPING_RULE, "served_branch": facts["served_branch"],
                         "dropped_branches": removed, "unmapped": unmapped},
        "plain_network": plain_network(plain, unmapped)}
    write_json(description, out / EXPORT_JSON)  # last: its presence marks a complete export
    return out / EXPORT_JSON
