"""Find the operations that make the host wait for the device inside a training step.

A CUDA step keeps the GPU busy only while the host can queue kernels ahead of it. Anything that needs a
value on the host stops that: `.item()`, `bool(t)` / `if t:`, boolean-mask indexing, `nonzero`, `unique`,
copies to the CPU. `torch.cuda.set_sync_debug_mode` reports these, but only on a GPU; `HostSyncRecorder`
watches the same operations at the dispatcher on any device, so the CPU test suite keeps the step free of
them (tests/test_engine.py) and `tools/bench.py step` counts them per step.

On a CPU tensor `.tolist()`, `.numpy()` and `.cpu()` dispatch nothing, so only a CUDA run sees those
(as copies to the CPU).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_PACKAGE = str(Path(__file__).resolve().parents[1])
_TORCH = str(Path(torch.__file__).resolve().parent)

# Each of these returns something whose size or value the host must read before it can go on.
_ALWAYS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
           aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default}
_MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                  aten._index_put_impl_.default}


@dataclass(frozen=True)
class HostSync:
    op: str
    where: str  # the innermost advcl_dist frame that caused it, or the innermost frame


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _syncs(func, args, kwargs) -> bool:
    if func in _ALWAYS:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in _MASK_INDEXING:
        return any(_is_mask(i) for i in args[1] if i is not None)
    if func in (aten._to_copy.default, aten.copy_.default):
        source = args[1] if func is aten.copy_.default else args[0]
        # _to_copy without a device (or with device=None) stays on the source device
        target = args[0].device if func is aten.copy_.default else kwargs.get("device") or source.device
        return source.device.type != "cpu" and torch.device(target).type == "cpu"
    return False


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if f.filename != __file__ and not f.filename.startswith(_TORCH)]
    ours = [f for f in frames if f.filename.startswith(_PACKAGE)] or frames
    f = ours[-1]
    return f"{Path(f.filename).name}:{f.lineno} {f.line}"


class HostSyncRecorder(TorchDispatchMode):
    """`with HostSyncRecorder() as rec:` … then `rec.syncs` lists every host-synchronising operation."""

    def __init__(self):
        super().__init__()
        self.syncs: list[HostSync] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.syncs.append(HostSync(str(func), _where()))
        return func(*args, **kwargs)
