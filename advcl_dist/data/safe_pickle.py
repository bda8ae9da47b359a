"""Unpickle files of plain arrays (CIFAR's python batches, pseudo-label dicts) without running code that a
crafted file could carry.

A pickle builds objects by calling the globals it names; an Unpickler that resolves only an allow-list of
harmless constructors cannot be made to call anything else. Two allow-lists:

- CIFAR (`load`): the official files (pickled in 2009 with protocol 2) hold dicts of bytes/str keys, lists of
  ints and str, and uint8 numpy arrays, built through numpy's `_reconstruct` (as `numpy.core.multiarray`, or
  `numpy._core.multiarray` when re-pickled by numpy >= 2), `ndarray` and `dtype`.
- plain arrays (`load_plain`): those, plus what Python 3 and numpy write for the same content at other
  protocols: numpy scalars (`scalar`, e.g. a list of np.int64), protocol-5 arrays (`numeric._frombuffer`)
  and protocol-2 bytes (`_codecs.encode`, latin-1 only).

Any other global is refused, so a file whose `__reduce__` names `os.system` stops before anything runs.
"""

from __future__ import annotations

import codecs
import functools
import pickle
from collections.abc import Callable
from pathlib import Path

from ..config_schema import ConfigError


def _numpy_core():
    import numpy

    return getattr(numpy, "_core", None) or numpy.core  # numpy 2 renamed numpy.core to numpy._core


@functools.cache
def _allowed() -> dict[tuple[str, str], object]:
    """The globals an official CIFAR file references, resolved without importing deprecated `numpy.core`."""
    import numpy

    reconstruct = _numpy_core().multiarray._reconstruct
    return {("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): numpy.ndarray,
            ("numpy", "dtype"): numpy.dtype}


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol 2 uses it for bytes; other codecs (a name picks a module) are refused."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):  # no codec lookup
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only latin-1 is accepted)")
    return codecs.encode(text, "latin1")


@functools.cache
def _allowed_plain() -> dict[tuple[str, str], object]:
    """CIFAR's globals plus numpy scalars, protocol-5 arrays and protocol-2 bytes, under both numpy names."""
    core = _numpy_core()
    allowed = dict(_allowed())
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    allowed[("_codecs", "encode")] = _latin1_bytes
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals in `allowed`; any other raises ConfigError(refusal(name))."""

    def __init__(self, file, allowed: dict[tuple[str, str], object], refusal: Callable[[str], str]):
        # latin1: Python 2 str in old files, as numpy and torchvision read them; Python 3 pickles are unaffected
        super().__init__(file, encoding="latin1")
        self.allowed, self.refusal = allowed, refusal

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise ConfigError(self.refusal(f"{module}.{name}"))
        return found


class CifarUnpickler(RestrictedUnpickler):
    """An Unpickler whose globals are only numpy's array reconstruction; any other raises ConfigError."""

    def __init__(self, file, path: str | Path):
        super().__init__(file, _allowed(), lambda name: (
            f"{path} is not a CIFAR file: it asks to load {name}, which could run code, so it was not read. "
            "Delete it and set data.download=true to fetch the official files."))
        self.path = path


def _read(path: str | Path, unpickler, malformed: Callable[[Exception], str]):
    with open(path, "rb") as f:
        try:
            return unpickler(f).load()
        except ConfigError:
            raise
        except Exception as err:  # truncated, not a pickle at all, or a refused codec
            raise ConfigError(malformed(err)) from err


def load(path: str | Path):
    """The object pickled in ``path``, read with `CifarUnpickler`; a refused or malformed file raises
    ConfigError naming it."""
    return _read(path, lambda f: CifarUnpickler(f, path), lambda err: (
        f"{path} is not a readable CIFAR file ({type(err).__name__}: {err}); delete it and set "
        "data.download=true to fetch the official files."))


def load_plain(path: str | Path, what: str, fix: str):
    """The object pickled in ``path`` if it is built from containers, numbers, strings and numpy arrays only.

    `what` names the expected content ("a pseudo-label pickle"), `fix` says what the user should do; a file
    naming any other global is refused before anything runs, and it and a malformed file raise a one-line
    ConfigError naming the file."""
    def refused(name: str) -> str:
        return (f"{path} was refused: it asks to load {name}, which could run code, and {what} holds only "
                f"containers, numbers, strings and numpy arrays. {fix}")

    def malformed(err: Exception) -> str:
        return f"{path} is not a readable pickle ({type(err).__name__}: {' '.join(str(err).split())[:200]}). {fix}"

    return _read(path, lambda f: RestrictedUnpickler(f, _allowed_plain(), refused), malformed)
