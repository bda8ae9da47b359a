"""Atomic checkpoint and JSON writes: a crash mid-write never leaves a truncated file behind."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import yaml
from torch import nn


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: Path) -> None:
    _atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be read ({e}); move it away to start afresh") from e


def save_array(array, path: Path) -> None:
    """`np.save` (or `np.savez` for a dict of arrays) that never leaves a truncated file behind."""
    import numpy as np

    _atomic(path, lambda f: np.savez(f, **array) if isinstance(array, dict) else np.save(f, array))


def write_json(obj, path: Path) -> None:
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def write_text(text: str, path: Path) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def load_encoder(path: str | Path, device: torch.device | str = "cpu", state: dict | None = None
                 ) -> tuple[nn.Module, dict]:
    """The encoder of a pretraining checkpoint, rebuilt from what the checkpoint itself records.

    `state`: the checkpoint at `path`, when the caller has already read it.

    Returns the encoder (eval mode) and facts about its run: method, arch, width, BN branches, step.
    Its architecture comes from the checkpoint's own config and its BN branches from its weights,
    so a finetuning config that differs from the pretraining one cannot build the wrong network.
    """
    from ..config import ConfigError
    from ..models import BACKBONES

    path = Path(path)
    if state is None:
        if not path.is_file():
            raise FileNotFoundError(f"pretrained checkpoint {path} does not exist; pretrain first (tools/pretrain.py) "
                                    "or point finetune.checkpoint / pseudo.fpre at a checkpoint.pt")
        state = load_checkpoint(path, device)
    if "model" not in state or "config" not in state:
        raise ConfigError(f"{path} is not a pretraining checkpoint of this package (no 'model'/'config' entries)")
    model_cfg = yaml.safe_load(state["config"])["model"]
    prefix = "encoder."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    branches = tuple(dict.fromkeys(k.split(".bns.")[1].split(".")[0] for k in weights if ".bns." in k))
    encoder = BACKBONES[model_cfg["arch"]](model_cfg["width"], branches)
    encoder.load_state_dict(weights)
    info = {"checkpoint": str(path.resolve()), "method": state.get("method"), "arch": model_cfg["arch"],
            "width": model_cfg["width"], "branches": list(branches), "step": state.get("step"),
            "finished": bool(state.get("finished"))}
    return encoder.to(device).eval(), info
