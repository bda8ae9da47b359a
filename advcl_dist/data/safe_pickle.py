"""Unpickle CIFAR's python batch files without running code that a crafted file could carry.

The official files (pickled in 2009 with protocol 2) hold dicts of bytes/str keys, lists of ints and str,
and uint8 numpy arrays. The arrays are the only objects built through globals: numpy's `_reconstruct`
(as `numpy.core.multiarray`, or `numpy._core.multiarray` when re-pickled by numpy >= 2), `ndarray` and
`dtype`. Any other global is refused, so a `data_batch_1` whose `__reduce__` names `os.system` stops
before anything runs.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

from ..config_schema import ConfigError


@functools.cache
def _allowed() -> dict[tuple[str, str], object]:
    """The globals an official CIFAR file references, resolved without importing deprecated `numpy.core`."""
    import numpy

    core = getattr(numpy, "_core", None) or numpy.core  # numpy 2 renamed numpy.core to numpy._core
    reconstruct = core.multiarray._reconstruct
    return {("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): numpy.ndarray,
            ("numpy", "dtype"): numpy.dtype}


class CifarUnpickler(pickle.Unpickler):
    """An Unpickler whose globals are only numpy's array reconstruction; any other raises ConfigError."""

    def __init__(self, file, path: str | Path):
        super().__init__(file, encoding="latin1")  # Python 2 str in the official files, as torchvision reads them
        self.path = path

    def find_class(self, module: str, name: str):
        found = _allowed().get((module, name))
        if found is None:
            raise ConfigError(
                f"{self.path} is not a CIFAR file: it asks to load {module}.{name}, which could run code, so it "
                "was not read. Delete it and set data.download=true to fetch the official files.")
        return found


def load(path: str | Path):
    """The object pickled in ``path``, read with `CifarUnpickler`; a refused or malformed file raises
    ConfigError naming it."""
    with open(path, "rb") as f:
        try:
            return CifarUnpickler(f, path).load()
        except ConfigError:
            raise
        except Exception as err:  # truncated or not a pickle at all
            raise ConfigError(f"{path} is not a readable CIFAR file ({type(err).__name__}: {err}); delete it "
                              "and set data.download=true to fetch the official files.") from err
