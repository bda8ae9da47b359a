"""Evaluation sharded over ranks in fixed blocks, with a per-block cache a restarted job reads back.

The test images (or any list of dataset indices) are cut into blocks of `eval.batch_size` in index
order; block boundaries do not depend on the number of ranks, and each rank takes a contiguous run of
blocks. Every block is attacked as one batch with randomness of its own: PGD's start of an image comes
from (seed, image index) (`StepRandom.keyed`) and AutoAttack is seeded per block. So a block's flags,
and hence results.json, are the same on any number of ranks.

Per attack, each finished block's flags are written (atomically) to
`<out_dir>/eval_cache/<attack>/<start>-<end>.npy`; `key.json` says which classifier (path and
SHA-256), data and attack settings they belong to. A requeued or restarted evaluation reads finished
blocks back. A cache whose key differs in anything but the classifier's path is stale and is
recomputed; one made for another classifier file is an error (its results are not ours to delete).
An unreadable block file is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError
from .data.loader import ordered_batches, subset
from .distributed import DistInfo, gather_shards
from .faults import fault_point
from .run_folder import read_json, save_array, write_json

CACHE = "eval_cache"


class EvaluationStopped(Exception):
    """A launcher's stop request arrived; finished blocks are cached, the requeued job resumes there."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def blocks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) positions of consecutive blocks of `size` covering n items."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def rank_share(items: Sequence, rank: int, world: int) -> list:
    """A contiguous run of `items` for `rank`: the first len % world ranks get one more."""
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (rank < extra)])


class FlagCache:
    """Per-block flags of each attack under `<folder>`; `key` identifies what they were computed for."""

    def __init__(self, folder: Path, key: dict, dist_info: DistInfo, log: Callable[[str], None]):
        self.folder, self.key, self.dist, self.log = Path(folder), key, dist_info, log
        error = [None]
        if dist_info.is_main:
            try:
                self._claim()
            except ConfigError as e:
                error = [str(e)]
        if dist_info.world_size > 1:  # every rank raises rank 0's error, none waits for the others
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise ConfigError(error[0])

    def _claim(self) -> None:
        key_path = self.folder / "key.json"
        try:
            old = read_json(key_path)
        except RuntimeError:
            old = {}  # unreadable key: nothing below it can be trusted
        if old and old.get("classifier") != self.key["classifier"]:
            raise ConfigError(f"{self.folder} holds evaluation results of another classifier "
                              f"({old.get('classifier')}), not {self.key['classifier']}; evaluate into another "
                              f"out_dir, or delete {self.folder}")
        if old != self.key:
            if old is not None and self.folder.exists():
                changed = sorted(k for k in old.keys() | self.key.keys() if old.get(k) != self.key.get(k))
                self.log(f"cache {self.folder} was made with other {', '.join(changed)}; recomputing")
            shutil.rmtree(self.folder, ignore_errors=True)
            write_json(self.key, key_path)

    def path(self, attack: str, start: int, end: int) -> Path:
        return self.folder / attack / f"{start}-{end}.npy"

    def read(self, attack: str, start: int, end: int, rows: int) -> np.ndarray | None:
        path = self.path(attack, start, end)
        if not path.is_file():
            return None
        try:
            flags = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            self.log(f"cache block {path} is unreadable ({e}); recomputing it")
            return None
        if flags.shape != (rows, end - start) or flags.dtype != np.uint8:
            self.log(f"cache block {path} has shape {flags.shape} {flags.dtype}, not ({rows}, {end - start}) "
                     "uint8; recomputing it")
            return None
        return flags

    def write(self, attack: str, start: int, end: int, flags: np.ndarray) -> None:
        save_array(flags.astype(np.uint8), self.path(attack, start, end))


def sharded_flags(attack: str, run_block: Callable[[torch.Tensor, torch.Tensor, list[int], int], torch.Tensor],
                  rows: int, source, indices: Sequence[int], block_size: int, image_size: int | None,
                  dist_info: DistInfo, cache: FlagCache | None = None, stop=None,
                  log: Callable[[str], None] = print) -> np.ndarray:
    """Flags [rows, len(indices)] (uint8) of `attack` over the images `indices` of `source`, on every rank.

    `run_block(x, y, block_indices, block_start)` returns the block's flags [rows, n] (bool) for float
    images `x` and labels `y`. This rank computes its share of the blocks that are not cached; all
    ranks end with every flag (gathered in index order).
    """
    indices = [int(i) for i in indices]
    mine = rank_share(blocks(len(indices), block_size), dist_info.rank, dist_info.world_size)
    todo = []
    parts: dict[tuple[int, int], np.ndarray] = {}
    for start, end in mine:
        cached = cache.read(attack, start, end, rows) if cache is not None else None
        if cached is not None:
            parts[(start, end)] = cached
        else:
            todo.append((start, end))
    totals = torch.tensor([len(mine) - len(todo), len(todo)], dtype=torch.int64, device=dist_info.device)
    if dist_info.world_size > 1:
        dist.all_reduce(totals)
    log(f"{attack}: {len(indices)} images in {int(totals.sum())} blocks of ≤ {block_size} over "
        f"{dist_info.world_size} rank(s); {int(totals[0])} blocks cached, {int(totals[1])} to run")
    stopped = _run_blocks(attack, run_block, source, indices, todo, block_size, image_size, dist_info, cache, stop,
                          parts)
    if _any_rank(stopped, dist_info):
        raise EvaluationStopped(attack)
    local = np.concatenate([parts[b] for b in mine], axis=1) if mine else np.zeros((rows, 0), np.uint8)
    # one row per image; shards are contiguous in rank order, so the gathered rows are in index order
    flags, _ = gather_shards(torch.from_numpy(local).T.contiguous().to(dist_info.device))
    return flags.cpu().T.numpy()


def _run_blocks(attack, run_block, source, indices, todo, block_size, image_size, dist_info, cache, stop,
                parts) -> bool:
    """Compute the blocks in `todo` (runs of consecutive blocks decoded in one pass); True when stopped."""
    runs: list[list[tuple[int, int]]] = []
    for block in todo:
        if runs and runs[-1][-1][1] == block[0]:
            runs[-1].append(block)
        else:
            runs.append([block])
    for run in runs:
        run_indices = indices[run[0][0]:run[-1][1]]
        batches = ordered_batches(subset(source, run_indices), block_size, image_size, dist_info.device)
        for (start, end), (x, y) in zip(run, batches):
            if stop is not None and stop.requested:
                return True
            flags = run_block(x, y, indices[start:end], start).to("cpu", torch.uint8).numpy()
            parts[(start, end)] = flags
            if cache is not None:
                cache.write(attack, start, end, flags)
            fault_point("evaluate.between_blocks")
    return False


def _any_rank(flag: bool, dist_info: DistInfo) -> bool:
    if dist_info.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=dist_info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
