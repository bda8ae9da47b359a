"""One live run per folder: an exclusive `flock` on `<out_dir>/.lock`, held by rank 0 for the stage's duration.

Two runs into one out_dir would both train and interleave their metrics and checkpoints. `flock` is
released by the kernel when its holder dies (SIGKILL, node crash on a local file system; on NFS the client
maps it to a POSIX lock that the server frees with the client's lease), so a stale lock from a dead process
is simply taken over — there is no pid file to judge stale. The lock file records who holds it, for the
message the second run prints. Within one process the lock is re-entrant (the pipeline's stages and
finetuning's evaluation nest), counted per folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .config_schema import ConfigError, UserError
from .run_folder import remove_stale_temporaries

LOCK = ".lock"
_held: dict[Path, list] = {}  # resolved folder → [open file, depth, whether this lock created the folder]


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return (f"pid {info['pid']} on {info['host']} since {info['since']} "
                f"({' '.join(info['argv'])[:120]})")
    except (OSError, ValueError, KeyError):
        return "another process"


def acquire(folder: str | Path) -> None:
    """Take `folder`'s lock (creating the folder), or raise ConfigError naming the live holder."""
    from .run_folder import OutputError

    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
        return
    path = folder / LOCK
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"out_dir {folder} is a file, not a folder; choose another out_dir")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise OutputError(f"cannot use out_dir {folder}: {e.strerror or e}; choose another out_dir") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"out_dir {folder} is in use by {_holder(path)}; wait for that run to end (or stop it), "
                          "or choose another out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}) + "\n")
    f.flush()
    _held[folder] = [f, 1, created]
    stale = remove_stale_temporaries(folder)
    if stale:
        print(f"[run] removed {len(stale)} temporary file(s) of a writer killed mid-write under {folder}",
              file=sys.stderr, flush=True)


def release(folder: str | Path) -> None:
    folder = Path(folder).resolve()
    entry = _held.get(folder)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[folder]
        if entry[2] and [p.name for p in folder.iterdir()] == [LOCK]:
            # a run that stopped before writing anything (a config error) leaves no folder behind
            (folder / LOCK).unlink()
            folder.rmdir()
        entry[0].close()  # closing the last descriptor releases the flock


@contextlib.contextmanager
def folder_lock(folder: str | Path, dist_info=None) -> Iterator[None]:
    """Hold `folder`'s lock for the block: rank 0 takes it, and every rank of the launch learns the outcome
    (a collective), so that a refused launch stops on all ranks instead of leaving the others waiting."""
    from .distributed import world_size

    main = dist_info is None or dist_info.is_main
    error = None
    if main:
        try:
            acquire(folder)
        except UserError as e:
            error = e
    if world_size() > 1:
        import torch.distributed as dist

        message = [str(error) if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            error = ConfigError(message[0])
    if error is not None:
        raise error
    try:
        yield
    finally:
        if main:
            release(folder)
