"""float64 training for tests that compare runs tightly: the network, its loaded weights and the views.

In float32, rounding differences (another batch split, thread count or CPU's kernels) flip ReLUs whose input
is ~0 and the signs of PGD steps, and a tiny network amplifies that within steps; float64 leaves only
rounding differences (~1e-13)."""
import contextlib

import torch

import advcl_dist.data.augment as augment


def _to_float64(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float64) / (255.0 if images.dtype == torch.uint8 else 1.0)


def use_float64() -> None:
    """For the rest of this process (a rank's own process)."""
    torch.set_default_dtype(torch.float64)
    augment.to_float = _to_float64


@contextlib.contextmanager
def float64_on_one_thread():
    """Within the block only, on one thread (inside a pytest process, whose later tests expect float32)."""
    original, threads = augment.to_float, torch.get_num_threads()
    use_float64()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)
        augment.to_float = original
        torch.set_num_threads(threads)
