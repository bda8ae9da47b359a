"""What the FFCV path needs before FFCV is imported: the file's fields and a clear error when it is missing.

FFCV is an optional dependency (it compiles against libturbojpeg and OpenCV), so nothing imports it at
package import time.
"""

from __future__ import annotations

import contextlib

import torch

from ..config_schema import UserError

FIELDS = ("image", "label", "index")  # the fields tools/write_ffcv.py writes, in this order

INSTALL_HINT = (
    "Install it with `make install` (it runs apt-get install pkg-config libturbojpeg0-dev libopencv-dev and "
    "pip install -e '.[ffcv]', which builds FFCV 1.0.2 from source), or set data.format=torchvision."
)


class FFCVNotInstalledError(UserError, ImportError):
    """data.format=ffcv (or a .beton) was asked for, but FFCV cannot be imported here."""


@contextlib.contextmanager
def keep_torch_threads():
    """FFCV sets torch's intra-op threads to 1 when imported and to its decode threads when a loader is made
    or iterated; the training step's own thread count is put back afterwards."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def require_ffcv() -> None:
    """Import FFCV, or raise FFCVNotInstalledError saying how to install it."""
    try:
        with keep_torch_threads():
            import ffcv  # noqa: F401
            import ffcv.loader  # noqa: F401  (needs numba, OpenCV and Pillow, which a partial install may lack)
    except ImportError as err:
        raise FFCVNotInstalledError(f"the FFCV data path needs the ffcv package, but importing it failed "
                                    f"({err}). {INSTALL_HINT}") from err
