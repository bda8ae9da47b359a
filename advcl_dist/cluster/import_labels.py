"""Pseudo-labels made elsewhere, in the AdvCL authors' pickle format, as this package's pseudo_labels.npy.

The authors' format (LijieFan/AdvCL, pretraining_advCL.py, `--cname`, default `imagenet_clPretrain`):
`data/<cname>_pseudo_labels.pkl` is a pickled dict whose key `'pseudo_train_{K}'` (K unpadded, for K in
`num_classes_list = [2, 10, 50, 100, 500]`) holds one cluster id per training image, looked up by the
torchvision CIFAR10(train=True) index (dataset.py, CIFAR10IndexPseudoLabelEnsemble.__getitem__) and used as
cross-entropy targets with `ignore_index=-1`. The element type is not stated by their code (it only indexes
the value and calls `.long()` on the collated batch) and the published .pkl could not be inspected here, so
integer arrays, whole-valued float arrays and lists of ints are all accepted.

The file is read by `safe_pickle.load_plain` (no code runs); its columns are checked against the dataset the
config names (one label per image, ids in [-1, K-1]) and written as `pseudo_labels.npy` [N, len(pseudo.ks)]
int32, row i = dataset index i, as the clustering stage writes it, with `imported.json` beside it saying
where the labels came from. No `clusters.json` is written: that file marks a finished k-means stage.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..config import Config, ConfigError
from ..data import safe_pickle
from ..run_folder import save_array, write_json
from .pseudo_labels import CLUSTERS, PSEUDO_LABELS

IMPORTED = "imported.json"
WHAT = "a pseudo-label pickle (the AdvCL authors' format: a dict of label arrays)"
FIX = ("Point the importer at a pickle of a dict {'pseudo_train_<K>': integer array, ...}, or cluster with "
       "tools/cluster.py instead.")


def authors_key(k: int) -> str:
    """The dict key the authors' pretraining_advCL.py reads for K clusters."""
    return f"pseudo_train_{k}"


def read_label_pickle(path: str | Path) -> dict:
    """The pickled dict at `path`, unpickled without running code (anything but plain data is refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-label pickle {path} does not exist; give the path of the authors' "
                                "<cname>_pseudo_labels.pkl (e.g. data/imagenet_clPretrain_pseudo_labels.pkl)")
    table = safe_pickle.load_plain(path, WHAT, FIX)
    if not isinstance(table, dict):
        raise ConfigError(f"{path} holds a {type(table).__name__}, not a dict of label arrays. {FIX}")
    return table


def _label_column(value, key: str, k: int, n: int, dataset: str, path: Path) -> np.ndarray:
    """One K's labels as int32 [n], or a one-line ConfigError naming the file, the key and the fix."""
    labels = np.asarray(value)
    if labels.ndim == 2 and labels.shape[1] == 1:  # a column vector, e.g. faiss' search output
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ConfigError(f"{path}: {key!r} has shape {labels.shape}, expected one label per image ({n},). {FIX}")
    if labels.shape[0] != n:
        raise ConfigError(f"{path}: {key!r} has {labels.shape[0]} labels but {dataset} has {n} images; the pickle "
                          "labels another dataset (the authors' file labels CIFAR-10's 50000 training images): "
                          "set data.name / data.split / data.root to the dataset it was made for")
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels == np.round(labels)).all())
    if not integral:
        raise ConfigError(f"{path}: {key!r} holds {labels.dtype} values, not integer cluster ids. {FIX}")
    if n and (labels.min() < -1 or labels.max() >= k):
        raise ConfigError(f"{path}: {key!r} has labels in [{labels.min()}, {labels.max()}], outside [-1, {k - 1}] "
                          f"for K={k} (-1: no label, ignored as in the authors' loss); the key names another K "
                          "than its clustering had. Check the file, or cluster with tools/cluster.py")
    return labels.astype(np.int32)


def pseudo_labels_from_table(table: dict, ks, n: int, dataset: str, path: str | Path) -> np.ndarray:
    """[n, len(ks)] int32: column j = the labels under `authors_key(ks[j])`, in the order of `ks`."""
    path = Path(path)
    present = sorted(int(key.removeprefix("pseudo_train_")) for key in table
                     if isinstance(key, str) and key.removeprefix("pseudo_train_").isdigit())
    missing = [k for k in ks if authors_key(k) not in table]
    if missing:
        found = f"Ks {present} (keys pseudo_train_<K>)" if present else f"no pseudo_train_<K> keys (keys: " \
            f"{sorted(map(str, table))[:8]})"
        raise ConfigError(f"{path} has no labels for K={missing[0]} (key {authors_key(missing[0])!r}) of "
                          f"pseudo.ks={list(ks)}; it holds {found}: set pseudo.ks to some of those")
    return np.stack([_label_column(table[authors_key(k)], authors_key(k), k, n, dataset, path) for k in ks], axis=1)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_pseudo_labels(cfg: Config, pickle_path: str | Path) -> Path:
    """The authors' pickle → `<out_dir>/pseudo_labels.npy` (+ imported.json) for the data.* dataset and
    pseudo.ks; returns the .npy path, to be given to pretraining as pseudo.labels."""
    from ..data.source import image_source  # torch and the dataset modules: only once the arguments are good

    source, out = Path(pickle_path), Path(cfg.out_dir)
    if (out / CLUSTERS).exists():
        raise ConfigError(f"out_dir={out} holds a finished clustering stage ({CLUSTERS}); import into another "
                          "out_dir so that its k-means labels are not mixed with imported ones")
    table = read_label_pickle(source)
    d = cfg.data
    n = len(image_source(d))
    labels = pseudo_labels_from_table(table, cfg.pseudo.ks, n, f"{d.name}/{d.split} (data.name/data.split)", source)
    out.mkdir(parents=True, exist_ok=True)
    save_array(labels, out / PSEUDO_LABELS)
    write_json({"source": str(source.resolve()), "sha256": _sha256(source), "format": "advcl-authors-pickle",
                "keys": [authors_key(k) for k in cfg.pseudo.ks], "ks": list(cfg.pseudo.ks), "dataset": d.name,
                "split": d.split, "root": d.root, "n": n,
                "clusters": {str(k): {"used": int(np.unique(col[col >= 0]).size), "unlabelled": int((col < 0).sum())}
                             for k, col in zip(cfg.pseudo.ks, labels.T)}}, out / IMPORTED)
    return out / PSEUDO_LABELS
