"""Checkpoints: written atomically (run_folder.atomic_write), read back, and the encoder of a pretraining run."""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch
import yaml
from torch import nn

from ..config_schema import ConfigError
from ..run_folder import atomic_write


class UnsafeFileError(ConfigError):
    """A file that would run code when loaded."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Serialise in memory, then write atomically: torch's zip writer turns a full disk into an opaque
    RuntimeError, a plain `write` into the OSError that `atomic_write` reports with the path."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's tensors and plain values, read without running any of its code.

    `weights_only=True` unpickles only tensors, containers, numbers and strings (our checkpoints hold
    nothing else: configs are YAML strings, optimizer/scheduler states plain dicts), so a crafted file
    cannot execute code when it is finetuned, clustered, evaluated or resumed. A file that needs more is
    refused with the reason."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused is None:  # not a pickle of objects at all ("Unsupported operand"): text, .npy, ...
            raise ConfigError(f"{path} cannot be read as a torch checkpoint (it is not a checkpoint but a text, "
                              "numpy or other file); point at a checkpoint.pt / classifier.pt or a state dict "
                              "file") from None
        raise UnsafeFileError(f"{path} was refused: it holds a Python object ({refused.group(1)}) beyond tensors "
                              "and plain values, and loading it could run code. Use a checkpoint written by this "
                              "package, or re-save the weights you trust as a plain state dict "
                              "(torch.save(model.state_dict(), f))") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated, not a torch file, a folder, ...
        first = " ".join(str(e).split())[:200]
        raise ConfigError(f"{path} cannot be read as a torch checkpoint ({type(e).__name__}: {first}); it is "
                          "damaged or not a checkpoint: point at another file, or move it away to start "
                          "afresh") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a checkpoint or state dict; point at a "
                          "checkpoint.pt / classifier.pt of this package or a state dict file")
    return state


# What DeepSpeed's ZeRO optimizer shards pickle beside tensors: plain records (a loss scaler's numbers, an
# enum, a fragment's offsets). DeepSpeed reads its shards with a full unpickler; we let it only after the
# pickle of every shard names nothing else.
DEEPSPEED_GLOBALS = frozenset({"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                               "deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.utils.tensor_fragment.fragment_address"})


def check_deepspeed_shards(folder: Path) -> None:
    """Refuse a DeepSpeed checkpoint folder whose files would run code when DeepSpeed unpickles them.

    `get_unsafe_globals_in_checkpoint` reads the pickles' opcodes without executing them; any callable a
    pickle can invoke must first be named as a global, so a file naming only torch's safe types and
    DEEPSPEED_GLOBALS cannot run anything else."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for shard in sorted(Path(folder).glob("*.pt")):
        try:
            unsafe = set(get_unsafe_globals_in_checkpoint(shard)) - DEEPSPEED_GLOBALS
        except Exception as e:  # truncated, not a torch file
            raise ConfigError(f"{shard} cannot be read as a DeepSpeed checkpoint shard ({type(e).__name__}); it is "
                              "damaged: move the run's checkpoint.pt and deepspeed/ away to start afresh") from None
        if unsafe:
            raise UnsafeFileError(f"{shard} was refused: it holds a Python object ({sorted(unsafe)[0]}) beyond what "
                                  "DeepSpeed writes, and loading it could run code. Resume only from DeepSpeed "
                                  "checkpoints written by this package, or start a new out_dir")


def load_weights(module: nn.Module, weights: dict, path: Path) -> None:
    """`module.load_state_dict(weights)`, or one clear error when `path` holds another network's weights."""
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
    from ..models import BACKBONES

    path = Path(path)
    if state is None:
        if not path.is_file():
            raise FileNotFoundError(f"pretrained checkpoint {path} does not exist; pretrain first (tools/pretrain.py) "
                                    "or point finetune.checkpoint / pseudo.fpre at a checkpoint.pt")
        state = load_checkpoint(path, device)
    if "classifier" in state:
        raise ConfigError(f"{path} is a finetuned classifier, not a pretraining checkpoint; point at the "
                          "checkpoint.pt of a pretraining run (its encoder is what finetuning and clustering use)")
    if "model" not in state or "config" not in state:
        raise ConfigError(f"{path} is not a pretraining checkpoint of this package (no 'model'/'config' entries)")
    model_cfg = (yaml.safe_load(state["config"]) or {}).get("model") or {}
    if model_cfg.get("arch") not in BACKBONES:
        raise ConfigError(f"{path} records model.arch={model_cfg.get('arch')!r}, not one of {sorted(BACKBONES)}; "
                          "it was written by another version or program")
    prefix = "encoder."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    branches = tuple(dict.fromkeys(k.split(".bns.")[1].split(".")[0] for k in weights if ".bns." in k))
    encoder = BACKBONES[model_cfg["arch"]](model_cfg["width"], branches)
    load_weights(encoder, weights, path)
    info = {"checkpoint": str(path.resolve()), "method": state.get("method"), "arch": model_cfg["arch"],
            "width": model_cfg["width"], "branches": list(branches), "step": state.get("step"),
            "finished": bool(state.get("finished"))}
    return encoder.to(device).eval(), info
