"""One stage's run folder: `config.yaml`, `run.json`, the "finished" test and the atomic writers.

Pretraining, clustering, finetuning, evaluation, the pipeline and the launcher all keep their
bookkeeping here, so a folder written by any stage reads the same way:
- `config.yaml`: the resolved config of the latest (re)start; a resume with another config records the
  changed keys in run.json before the file is replaced;
- `run.json`: provenance (world size, one node name per rank, device, git commit, versions), the
  first start kept across resumes, every resume listed, `finished` set when the stage completes.
Every write is atomic (a temporary file, fsync, rename): a crash never leaves half a file behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from .config_schema import ConfigError, UserError
from .faults import fault_point
from .provenance import now, run_info

CONFIG = "config.yaml"
RUN = "run.json"
TMP_SUFFIX = ".tmp"


class OutputError(UserError, OSError):
    """An output that cannot be written (disk full, no permission, a file where a folder should be)."""


def _file_mode() -> int:
    """0o666 less the umask: what `open()` would give, where mkstemp's temporary files are always 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write) -> None:
    """`write(f)` into a temporary file beside `path`, fsync, then rename over `path`.

    The file gets the mode plain `open()` would give (the umask's), so that teammates can read results on a
    shared file system. A full disk or a refused write raises `OutputError` naming `path`, with any previous
    `path` untouched; a process killed mid-write leaves a `.<name>.*.tmp` that the next start removes
    (`remove_stale_temporaries`)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fault_point("write.before_rename", path.name)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        kept = f"; the previous {path.name} is unchanged" if path.is_file() else ""
        raise OutputError(f"cannot write {path}: {e.strerror or e}{kept}. Free space there, fix its permissions, "
                          "or choose another out_dir") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path, depth: int = 3) -> list[Path]:
    """Delete the temporary files of writers killed mid-write in `folder` and its subfolders down to `depth`
    (a stage writes at most `eval_cache/<attack>/<block>`); run by the folder lock's holder. The depth bound
    keeps an out_dir pointed at a large shared tree from being walked whole."""
    stale = []
    level = [Path(folder)] if Path(folder).is_dir() else []
    for _ in range(depth + 1):
        below = []
        for node in level:
            for entry in node.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    below.append(entry)
                elif entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX) and entry.is_file():
                    stale.append(entry)
        level = below
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_json(obj, path: Path) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_array(array, path: Path) -> None:
    """`np.save` (or `np.savez` for a dict of arrays) that never leaves a truncated file behind."""
    import numpy as np

    atomic_write(path, lambda f: np.savez(f, **array) if isinstance(array, dict) else np.save(f, array))


def read_json(path: Path) -> dict | None:
    """The JSON object at `path`, None when the file is missing; a clear error when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); move it away to start this stage afresh") from None


def changed_keys(old_yaml: str, new_yaml: str) -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, val in node.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    old, new = flat(yaml.safe_load(old_yaml)), flat(yaml.safe_load(new_yaml))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def is_finished(folder: str | Path) -> bool:
    """Whether the stage that owns `folder` completed (its run.json says so)."""
    info = read_json(Path(folder) / RUN)
    return bool(info and info.get("finished") is True)


class RunFolder:
    """The folder of one stage on one rank; only rank 0 writes.

    `start` is collective (it gathers every rank's node name); `finish` is not.
    """

    def __init__(self, path: str | Path, stage: str, dist_info):
        self.path, self.stage, self.dist = Path(path), stage, dist_info
        self.info: dict = {}

    @property
    def main(self) -> bool:
        return self.dist.is_main

    def start(self, config_yaml: str, resumed_at: dict | None = None, **facts) -> list[str]:
        """Write config.yaml and run.json for this (re)start; returns the config keys changed since the last
        start (empty for a fresh run). `resumed_at` (e.g. {"step": 120}) marks a resume."""
        from .distributed import node_names

        nodes = node_names()  # a collective: every rank takes part
        if not self.main:
            return []
        self.path.mkdir(parents=True, exist_ok=True)
        previous = read_json(self.path / RUN) or {}
        saved = self.path / CONFIG
        changed = changed_keys(saved.read_text(), config_yaml) if resumed_at is not None and saved.is_file() else []
        info = run_info(self.dist.world_size, nodes, self.dist.device)
        info.update(stage=self.stage, launcher=self.dist.launcher, finished=False, **facts)
        if resumed_at is not None:
            info["start"] = previous.get("start", info["start"])
            resume = {**resumed_at, "time": now(), "world_size": self.dist.world_size}
            if changed:
                resume["changed_config"] = changed
            info["resumes"] = previous.get("resumes", []) + [resume]
        write_text(config_yaml, saved)
        write_json(info, self.path / RUN)
        self.info = info
        return changed

    def finish(self, finished: bool = True, **facts) -> None:
        """Record the end of this session: `finished` (the stage is complete) and any facts."""
        if not self.main:
            return
        if finished:
            fault_point("stage.before_finished")
        self.info.update(end=now(), finished=finished, **facts)
        write_json(self.info, self.path / RUN)
