"""Tiny dataset files in the real on-disk formats (CIFAR pickles, STL-10 binaries, ImageFolder PNGs)."""

import pickle

import numpy as np
from PIL import Image

RNG = np.random.default_rng(1234)


def random_images(n, h=32, w=32):
    return RNG.integers(0, 256, size=(n, 3, h, w), dtype=np.uint8)


def pickle_to(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root):
    """Five train batches of different sizes and a test batch; returns the expected (images, labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    expected = {"train": ([], []), "test": ([], [])}
    sizes = [2, 3, 1, 2, 2, 3]
    for name, n in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], sizes):
        images, labels = random_images(n), RNG.integers(0, 10, size=n).tolist()
        pickle_to(folder / name, {"data": images.reshape(n, 3072), "labels": labels})
        split = expected["test" if name == "test_batch" else "train"]
        split[0].append(images)
        split[1].extend(labels)
    pickle_to(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return {k: (np.concatenate(imgs), labels) for k, (imgs, labels) in expected.items()}


def write_cifar100(root):
    folder = root / "cifar-100-python"
    folder.mkdir()
    expected = {}
    for split, n in [("train", 4), ("test", 2)]:
        images, labels = random_images(n), RNG.integers(0, 100, size=n).tolist()
        pickle_to(folder / split, {"data": images.reshape(n, 3072), "fine_labels": labels})
        expected[split] = (images, labels)
    pickle_to(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    return expected


def write_stl10(root):
    """STL-10 binaries store each image as [3,96,96] column-major (H and W swapped) and labels as 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir()
    expected = {}
    for split, n in [("train", 3), ("test", 2), ("unlabeled", 2)]:
        images = random_images(n, 96, 96)
        np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tofile(folder / f"{split}_X.bin")
        labels = [-1] * n
        if split != "unlabeled":
            stored = RNG.integers(1, 11, size=n).astype(np.uint8)
            stored.tofile(folder / f"{split}_y.bin")
            labels = (stored.astype(np.int64) - 1).tolist()
        expected[split] = (images, labels)
    (folder / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join("0 1" for _ in range(10)) + "\n")
    return expected


def write_imagefolder(root):
    """Two classes with non-square RGB PNGs plus one greyscale PNG; returns expected per-split lists."""
    expected = {}
    for split in ("train", "test"):
        items = []
        for label, cls in enumerate(["cat", "dog"]):  # ImageFolder sorts classes and files
            (root / split / cls).mkdir(parents=True)
            for name in ("a.png", "b.png"):
                hwc = RNG.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
                Image.fromarray(hwc).save(root / split / cls / name)
                items.append((hwc.transpose(2, 0, 1), label))
        grey = RNG.integers(0, 256, size=(10, 14), dtype=np.uint8)
        Image.fromarray(grey).save(root / split / "dog" / "c.png")
        items.append((np.repeat(grey[None], 3, axis=0), 1))
        expected[split] = items
    return expected


def write_image_classes(root, classes):
    """An ImageFolder split at ``root``, class by class: ``{class: [(h, w), ...]}`` → PNGs 0.png, 1.png, ...
    in each class folder; returns their paths in ImageFolder's (sorted) order."""
    paths = []
    for cls in sorted(classes):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(classes[cls]):
            path = root / cls / f"{i}.png"
            Image.fromarray(RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def truncate(path):
    """Cut a file to half its length, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _py2_style_array(array):
    """What Python 2's numpy put in the official CIFAR pickles: `_reconstruct` and the raw bytes as a str."""
    _reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
    state = (1, array.shape, array.dtype, False, array.tobytes().decode("latin1"))
    return _reconstruct, (np.ndarray, (0,), "b"), state


def py2_pickle_to(path, obj):
    """Pickle ``obj`` the way the official CIFAR files were written (Python 2, protocol 2): arrays through
    ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype`` only."""
    import io

    class Py2Pickler(pickle.Pickler):
        def reducer_override(self, value):
            return _py2_style_array(value) if isinstance(value, np.ndarray) else NotImplemented

    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
