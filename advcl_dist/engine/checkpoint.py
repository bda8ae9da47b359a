"""Checkpoints: written atomically (run_folder.atomic_write), read back, and the encoder of a pretraining run."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from ..run_folder import atomic_write


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be read ({e}); move it away to start afresh") from e


def load_weights(module: nn.Module, weights: dict, path: Path) -> None:
    """`module.load_state_dict(weights)`, or one clear error when `path` holds another network's weights."""
    from ..config import ConfigError

    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(f"{path} holds the weights of another network than this config builds ({detail}); "
                          f"it was written by another run: use another out_dir, or move {path} away to start "
                          "afresh") from None


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
