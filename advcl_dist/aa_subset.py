"""Which test images AutoAttack runs on: `eval.aa_n`, `eval.aa_subset`, `eval.aa_seed`, `eval.aa_indices`.

AutoAttack costs hundreds of forward-backward passes an image, so it often runs on a subset. The first n images
in file order are a biased subset wherever files are listed class by class (an ImageFolder: the first 100
images of a 10-class folder are one class; the first 5000 of ImageNet's validation folder are 5 classes). The
default is a class-stratified sample: each class gets n · (its share of the test set) images, rounded by largest
remainder (ties to the lower class), drawn without replacement by numpy's seeded PCG64 generator. It depends on
the labels, n and the seed only, so every rank, every method and every seed of a sweep attack the same images,
and their AA numbers compare like with like. `first` keeps the first n in file order (RobustBench's CIFAR
protocol, on files whose order is already shuffled); `eval.aa_indices` names the images in a file (e.g.
RobustBench's 5000-image ImageNet list of `<class>/<file>` lines). results.json records the rule, the seed and
the SHA-256 of the indices, so two AA numbers can be checked to be on the same images.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .config_schema import ConfigError

AA_RULES = ("stratified", "first")


def source_labels(source) -> np.ndarray:
    """The int64 labels of an evaluation source (a `get_dataset` dataset or a .beton's images), without decoding
    an image."""
    labels = getattr(source, "labels", None)
    if labels is None:
        labels = getattr(source, "targets", None)  # torchvision's ImageFolder
    if labels is None:
        raise TypeError(f"{type(source).__name__} exposes no labels (.labels or .targets)")
    return np.asarray(labels, dtype=np.int64)


def class_quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """Images per class summing to n, proportional to the class sizes `counts` (largest remainder first, ties to
    the lower class index); exact integer arithmetic, so no rounding depends on the platform."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not 0 <= n <= total:
        raise ValueError(f"cannot take {n} of {total} images")
    quotas, remainders = np.divmod(n * counts, total)
    short = n - int(quotas.sum())
    order = np.lexsort((np.arange(len(counts)), -remainders))  # largest remainder first, then lower class
    quotas[order[:short]] += 1
    return quotas


def stratified_indices(labels, n: int, seed: int) -> np.ndarray:
    """n dataset indices, sorted, with `class_quotas` images of each class drawn at random (seeded)."""
    labels = np.asarray(labels, dtype=np.int64)
    if (labels < 0).any():
        raise ConfigError("the evaluation set has unlabelled images (label -1): AutoAttack needs labels; "
                          "evaluate on a labelled split")
    classes, counts = np.unique(labels, return_counts=True)
    members = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])  # per class, in index order
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(group, size=int(q), replace=False) for group, q in zip(members, class_quotas(counts, n))]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def read_index_file(path: str | Path, source, n_test: int) -> np.ndarray:
    """The sorted dataset indices a file names: a .npy of integers (read without pickle), or text with one entry a
    line (blank lines and `#` comments skipped): an index, or a `<class>/<file>` path in the split's ImageFolder.
    """
    path = Path(path)
    where = f"eval.aa_indices file {path}"
    if path.suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where} is not a readable .npy of integers ({e}); write it with "
                              "np.save(path, np.array(indices))") from None
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ConfigError(f"{where} holds a {values.dtype} array of shape {values.shape}, not a 1-D integer "
                              "array of test-image indices")
        indices = values.astype(np.int64)
    else:
        try:
            lines = [(i, line.split("#")[0].strip()) for i, line in enumerate(path.read_text().splitlines(), 1)]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where} cannot be read as text ({type(e).__name__}); give one index or "
                              "<class>/<file> a line, or a .npy") from None
        entries = [(i, text) for i, text in lines if text]
        named = not all(text.lstrip("+-").isdigit() for _, text in entries)
        paths = _relative_paths(source) if named else {}  # built once: 5000 lines against a 50,000-image folder
        indices = np.array([_index_of(text, i, paths, source, where) for i, text in entries], dtype=np.int64)
    if indices.size == 0:
        raise ConfigError(f"{where} names no images; give one index or <class>/<file> a line")
    bad = indices[(indices < 0) | (indices >= n_test)]
    if bad.size:
        raise ConfigError(f"{where}: index {int(bad[0])} is outside the test set (0 … {n_test - 1}); the file is for "
                          "another dataset or split")
    unique, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        raise ConfigError(f"{where} names image {int(unique[counts > 1][0])} more than once; list each image once")
    return unique


def _index_of(text: str, line: int, paths: dict[str, int] | None, source, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    if paths is None:
        raise ConfigError(f"{where}, line {line}: {text!r} is not an index, and this test set has no file names "
                          "(only an ImageFolder has); give integer indices")
    if text not in paths:
        raise ConfigError(f"{where}, line {line}: {text!r} is not an image of the test folder "
                          f"({getattr(source, 'root', '?')}); entries are <class folder>/<file name>")
    return paths[text]


def _relative_paths(source) -> dict[str, int] | None:
    """`<class>/<file>` → index for an ImageFolder (its `samples` and `root`); None for a set without file names."""
    samples, root = getattr(source, "samples", None), getattr(source, "root", None)
    if samples is None or root is None:
        return None
    return {Path(p).relative_to(root).as_posix(): i for i, (p, _) in enumerate(samples)}


def indices_sha256(indices) -> str:
    """SHA-256 of the indices as little-endian int64: equal hashes, equal images (on the same test set)."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def aa_selection(e, source) -> tuple[np.ndarray, dict]:
    """The AutoAttack images of `source` under the evaluation config `e`, and what results.json records of them."""
    n_test, labels = len(source), source_labels(source)
    rule, seed = e.aa_subset, None
    if e.aa_indices:
        indices, rule = read_index_file(e.aa_indices, source, n_test), "file"
        if e.aa_n is not None and e.aa_n != len(indices):
            raise ConfigError(f"eval.aa_n={e.aa_n} but eval.aa_indices ({e.aa_indices}) names {len(indices)} "
                              "images; set eval.aa_n=null to use the file's images")
    elif e.aa_n is None or e.aa_n >= n_test:
        indices, rule = np.arange(n_test, dtype=np.int64), "all"
    elif rule == "first":
        indices = np.arange(e.aa_n, dtype=np.int64)
    else:
        indices, seed = stratified_indices(labels, e.aa_n, e.aa_seed), e.aa_seed
    _, per_class = np.unique(labels[indices], return_counts=True)
    record = {"n": int(len(indices)), "rule": rule, "seed": seed, "file": str(e.aa_indices) if e.aa_indices else None,
              "sha256": indices_sha256(indices), "classes": int(len(per_class)),
              "per_class": {"min": int(per_class.min()), "max": int(per_class.max())} if len(per_class) else None}
    return indices, record
