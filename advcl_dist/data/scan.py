"""data.scan: decode every image of an ImageFolder once, before training, and name every file that would
stop it (unreadable, or of another size when data.image_size is null and images are batched as they are).

Without it, such a file stops an overnight run mid-epoch, and again on every resume. Decoding runs in
threads (torchvision's and PIL's decoders release the GIL); under a launch each rank decodes its share and
the findings, a few per size rather than one per image, are gathered so that every rank raises the same error.
"""

from __future__ import annotations

import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config_schema import ConfigError
from .datasets import UnreadableImageError, read_rgb

LISTED = 5  # files named in the error
PER_THREAD = 64  # paths handed to each thread at a time: bounded memory for millions of files


@dataclass
class Findings:
    """What one rank saw; merged across ranks. Positions index the scanned path list (dataset order)."""

    checked: int = 0
    unreadable: list[tuple[int, str, str]] = field(default_factory=list)  # (position, path, reason), first few
    unreadable_count: int = 0
    sizes: Counter = field(default_factory=Counter)  # (W, H) -> images of that size
    examples: dict = field(default_factory=dict)  # (W, H) -> its first LISTED (position, path)

    def add(self, position: int, path: str, result) -> None:
        self.checked += 1
        if isinstance(result, str):
            self.unreadable_count += 1
            if len(self.unreadable) < LISTED:
                self.unreadable.append((position, path, result))
            return
        self.sizes[result] += 1
        first = self.examples.setdefault(result, [])
        if len(first) < LISTED:
            first.append((position, path))


def probe(path: str):
    """(W, H) of the decoded image, or why it does not decode."""
    try:
        image = read_rgb(path)
    except UnreadableImageError as err:
        return err.reason
    return int(image.shape[-1]), int(image.shape[-2])


def scan_paths(paths: list[str], positions, threads: int, progress: bool) -> Findings:
    """Decode ``paths[p]`` for every p in ``positions`` on ``threads`` threads, with a tqdm bar."""
    from tqdm import tqdm

    findings = Findings()
    positions = list(positions)
    step = PER_THREAD * threads
    interval = 0.1 if sys.stderr.isatty() else 60  # a log file (SLURM) gets a line a minute, not ten a second
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(positions), desc="data.scan", unit="img",
                                                   disable=not progress, mininterval=interval,
                                                   dynamic_ncols=True) as bar:
        for start in range(0, len(positions), step):
            chunk = positions[start:start + step]
            for position, result in zip(chunk, pool.map(probe, [paths[p] for p in chunk])):
                findings.add(position, paths[position], result)
            bar.update(len(chunk))
    return findings


def merge(parts: list[Findings]) -> Findings:
    """One `Findings` of all ranks' parts, with the earliest positions kept as the listed examples."""
    total = Findings()
    for part in parts:
        total.checked += part.checked
        total.unreadable_count += part.unreadable_count
        total.unreadable = sorted(total.unreadable + part.unreadable)[:LISTED]
        total.sizes.update(part.sizes)
        for size, first in part.examples.items():
            total.examples[size] = sorted(total.examples.get(size, []) + first)[:LISTED]
    return total


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}×{size[1]}"


def majority_size(found: Findings) -> tuple[int, int]:
    """The most common (W, H); a tie goes to the size seen first."""
    first_seen = {size: first[0][0] for size, first in found.examples.items()}
    return max(found.sizes, key=lambda size: (found.sizes[size], -first_seen[size]))


def problems(found: Findings, image_size: int | None, root: str) -> str | None:
    """The one-line error for the bad files in ``found`` (None when there are none). Sizes matter only
    when data.image_size is null: images are then batched at their own size."""
    named = [(pos, f"{path} is unreadable ({reason})") for pos, path, reason in found.unreadable]
    odd_count, fixes = 0, []
    if found.unreadable_count:
        fixes.append("Replace or remove the unreadable files.")
    if image_size is None and len(found.sizes) > 1:
        majority = majority_size(found)
        odd_count = sum(found.sizes.values()) - found.sizes[majority]
        named += [(pos, f"{path} is {_size(size)}") for size, first in found.examples.items()
                  if size != majority for pos, path in first]
        fixes.append(f"Images are batched at their own size, and most ({found.sizes[majority]}) are "
                     f"{_size(majority)}: set data.image_size=N to resize and center-crop every image to N×N "
                     f"(e.g. data.image_size={min(majority)}).")
    bad = found.unreadable_count + odd_count
    if not bad:
        return None
    named = [text for _, text in sorted(named)[:LISTED]]
    more = f"; and {bad - len(named)} more" if bad > len(named) else ""
    return (f"data.scan: {bad} of {found.checked} images under {root} cannot be trained on: "
            f"{'; '.join(named)}{more}. {' '.join(fixes)}")


def _sharded(world_size: int) -> bool:
    """Whether the ranks of a launch share the scan (a process group of ``world_size`` ranks is up)."""
    import torch.distributed as dist

    return world_size > 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size


def _gather(part: Findings, world_size: int) -> list[Findings]:
    import torch.distributed as dist

    parts = [None] * world_size
    dist.all_gather_object(parts, part)
    return parts


def scan_images(dataset, *, workers: int, image_size: int | None, indices=None, rank: int = 0,
                world_size: int = 1, progress: bool = True) -> int:
    """Decode every image of ``dataset`` (an ImageFolder; only ``indices`` where given) once, on
    max(1, ``workers``) threads; raise ConfigError naming the bad files. Returns the number of images checked.

    Under a launch (a process group of ``world_size`` ranks) each rank decodes every world_size-th file
    and all ranks raise the same error; otherwise this process decodes them all."""
    paths = [path for path, _ in dataset.samples]
    if indices is not None:
        paths = [paths[int(i)] for i in indices]
    sharded = _sharded(world_size)
    positions = range(rank, len(paths), world_size) if sharded else range(len(paths))
    part = scan_paths(paths, positions, max(1, workers), progress and rank == 0)
    found = merge(_gather(part, world_size) if sharded else [part])
    message = problems(found, image_size, getattr(dataset, "root", "data.root"))
    if message:
        raise ConfigError(message)
    return found.checked
