"""Atomic checkpoint and JSON writes: a crash mid-write never leaves a truncated file behind."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


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


def write_json(obj, path: Path) -> None:
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def write_text(text: str, path: Path) -> None:
    _atomic(path, lambda f: f.write(text.encode()))
