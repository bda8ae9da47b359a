"""f_pre features for ClusterFit, each rank extracting (and caching) one contiguous shard of the dataset.

f_pre is either a pretraining checkpoint.pt of this package or a torchvision ResNet-50 state dict; both are
wrapped so that callers always pass float [0, 1] images, and any other file is refused naming pseudo.fpre.
With `resize_to` (pseudo.fpre_size) f_pre sees the images resized on the device to its own resolution (e.g.
224 for an ImageNet ResNet-50). Shards are cached per index range, so a requeued job, even at another world
size, reads them back instead of running the encoder again.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..data.loader import ordered_batches, subset
from ..distributed import barrier, world_size
from ..engine.checkpoint import UnsafeFileError, load_checkpoint, load_encoder
from ..run_folder import save_array, write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's ImageNet weights were trained on
IMAGENET_STD = (0.229, 0.224, 0.225)
_SHARD = re.compile(r"^(\d{9})-(\d{9})\.npy$")
FPRE_KINDS = ("pseudo.fpre must be a pretraining checkpoint.pt of this package (e.g. the pipeline's SimCLR run) "
              "or a torchvision ResNet-50 state dict (torch.save(resnet50.state_dict(), f))")


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous block of indices; the blocks in rank order are the dataset in index order."""
    return n * rank // world, n * (rank + 1) // world


class _NormalBranch(nn.Module):
    """Our encoders keep per-branch BN statistics; features come from the clean (`normal`) branch."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, (("normal", x.shape[0]),))


class _ImageNetNormalised(nn.Module):
    """torchvision weights expect ImageNet-normalised inputs; normalising here lets callers pass [0, 1]."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def load_fpre(path, device) -> tuple[nn.Module, dict]:
    """f_pre (eval mode, [0, 1] images → [B, D] features) and facts about it for clusters.json.

    The kind of file is told by its content: a dict with 'model' and 'config' is ours, anything else must be
    a torchvision ResNet-50 state dict (possibly under 'state_dict'/'model', possibly with DDP's 'module.').
    Other files (a classifier.pt, a results.json, another network's weights) raise a one-line ConfigError
    naming pseudo.fpre and what it must be.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pseudo.fpre={path} does not exist; pretrain first (the pipeline's SimCLR "
                                "stage) or point pseudo.fpre at a checkpoint.pt or a torchvision ResNet-50 "
                                "state dict")
    try:
        state = load_checkpoint(path, "cpu")
    except UnsafeFileError as e:
        raise UnsafeFileError(f"pseudo.fpre: {e}") from None
    except ConfigError as e:  # text (a results.json, a config), a numpy file, a bare tensor, a damaged file
        reason = str(e).removeprefix(str(path)).split("; point at")[0].strip()
        raise ConfigError(f"pseudo.fpre={path} {reason}; {FPRE_KINDS}") from None
    if "classifier" in state:
        raise ConfigError(f"pseudo.fpre={path} is a finetuned classifier (classifier.pt), not a pretraining "
                          f"checkpoint; {FPRE_KINDS}")
    if "model" in state and "config" in state:
        try:
            encoder, info = load_encoder(path, device, state)
        except ConfigError as e:  # another network's weights: say which setting named the file
            raise ConfigError(f"pseudo.fpre: {e}; {FPRE_KINDS}") from None
        return _NormalBranch(encoder).to(device).eval(), {**info, "kind": "advcl-dist"}
    net = _torchvision_resnet50(_state_dict_of(state, path), path)
    info = {"checkpoint": str(path.resolve()), "kind": "torchvision-resnet50", "method": None, "arch": "resnet50"}
    return _ImageNetNormalised(net).to(device).eval(), info


def _state_dict_of(state, path: Path) -> dict:
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"pseudo.fpre={path} is neither a checkpoint.pt of this package (with 'model' and "
                          f"'config') nor a state dict of tensors; {FPRE_KINDS}")
    return {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}


def _torchvision_resnet50(weights: dict, path: Path) -> nn.Module:
    import torchvision

    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()  # 2048-d pooled features
    expected = net.state_dict()
    # BN layers fill in a missing num_batches_tracked themselves (older torchvision files lack it)
    missing = sorted(k for k in expected.keys() - weights.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise ConfigError(f"pseudo.fpre={path} is not a checkpoint.pt of this package and its keys do not match a "
                          f"torchvision ResNet-50 state dict (conv1.weight, bn1.*, layer1-4.*, optional fc.*, "
                          f"optional 'module.' prefix): missing {missing[:5]} ({len(missing)}), "
                          f"unexpected {unexpected[:5]} ({len(unexpected)}); {FPRE_KINDS}")
    wrong = [f"{k} {tuple(v.shape)} instead of {tuple(expected[k].shape)}" for k, v in weights.items()
             if v.shape != expected[k].shape]
    if wrong:  # e.g. a wide ResNet-50: the same names, other widths
        raise ConfigError(f"pseudo.fpre={path} has the keys of a ResNet-50 but not its shapes ({len(wrong)} "
                          f"tensors, e.g. {', '.join(wrong[:3])}); {FPRE_KINDS}")
    net.load_state_dict(weights)
    return net


def resize_square(x: torch.Tensor, side: int | None) -> torch.Tensor:
    """Float images [B, C, H, W] resized to side × side, bilinear with antialiasing: what torchvision's
    transforms.functional.resize(img, [side, side], antialias=True) does to each float image; None: x."""
    if side is None or tuple(x.shape[-2:]) == (side, side):
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset, batch_size: int, image_size: int | None,
                     device: torch.device, labels: list | None = None, resize_to: int | None = None) -> torch.Tensor:
    """L2-normalised float32 features [len(dataset), D] on `device`, row i = dataset item i; the items'
    labels are appended to `labels` when a list is given.

    `image_size`: the side of the base images (as the loader makes them); `resize_to`: the side the encoder
    sees, resized on the device (`resize_square`, in float32 before any autocast), None: the base images.

    Eval mode (running BN statistics), so a row does not depend on which images share its batch.
    """
    if len(dataset) == 0:
        raise ValueError("extract_features got an empty dataset")
    device = torch.device(device)
    encoder.eval()
    rows = []
    for x, y in ordered_batches(dataset, batch_size, image_size, device):
        x = resize_square(x, resize_to)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            h = encoder(x)
        rows.append(F.normalize(h.float(), dim=1))
        if labels is not None:
            labels.extend(y.tolist())
    return torch.cat(rows)


def shard_features(encoder: nn.Module, dataset, *, batch_size: int, image_size: int | None, device,
                   folder: Path | None, key: dict, rank: int, world: int,
                   resize_to: int | None = None) -> tuple[torch.Tensor, int]:
    """This rank's rows of the features and their first dataset index, cached under `folder` when given;
    `resize_to` as in `extract_features` (the caller puts it in `key`).

    Cached shards are `<start>-<end>.npy` next to `key.json`; they are reused by any world size whose
    ranges they cover, and only while `key.json` equals `key` (same f_pre, same data).
    """
    start, end = shard_range(len(dataset), rank, world)
    if folder is None:
        return _extract_range(encoder, dataset, start, end, batch_size, image_size, device, resize_to), start
    folder = Path(folder)
    key = json.loads(json.dumps(key, default=str))  # compare what key.json will hold
    if rank == 0 and _stored_key(folder) != key:
        for stale in _shard_files(folder):
            stale.unlink(missing_ok=True)
        write_json(key, folder / "key.json")
    barrier()  # the other ranks look only after rank 0 has cleaned up
    if start == end:
        return _extract_range(encoder, dataset, start, end, batch_size, image_size, device, resize_to), start
    cached = _read_cached(folder, key, start, end) if _stored_key(folder) == key else None
    if cached is not None:
        return torch.from_numpy(cached).to(device), start
    x = _extract_range(encoder, dataset, start, end, batch_size, image_size, device, resize_to)
    save_array(x.cpu().numpy().astype(np.float32), folder / f"{start:09d}-{end:09d}.npy")
    return x, start


def _extract_range(encoder, dataset, start, end, batch_size, image_size, device, resize_to) -> torch.Tensor:
    if start == end:  # more ranks than images: an empty [0, D] shard, D learnt from one image
        return extract_features(encoder, subset(dataset, [0]), 1, image_size, device, resize_to=resize_to)[:0]
    return extract_features(encoder, subset(dataset, range(start, end)), batch_size, image_size, device,
                            resize_to=resize_to)


def _stored_key(folder: Path):
    try:
        return json.loads((folder / "key.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.npy") if _SHARD.match(p.name)) if folder.is_dir() else []


def _read_cached(folder: Path, key: dict, start: int, end: int) -> np.ndarray | None:
    """Rows [start, end) assembled from cached shards, or None when they do not cover the range."""
    ranges = [(int(m[1]), int(m[2]), p) for p in _shard_files(folder) if (m := _SHARD.match(p.name))]
    parts, pos = [], start
    while pos < end:
        covering = [r for r in ranges if r[0] <= pos < r[1]]
        if not covering:
            return None
        s, e, p = max(covering, key=lambda r: r[1])
        array = np.load(p, mmap_mode="r")
        if array.ndim != 2 or array.shape[0] != e - s or (parts and array.shape[1] != parts[0].shape[1]):
            return None  # not a shard written here: recompute rather than trust it
        stop = min(e, end)
        parts.append(array[pos - s:stop - s])
        pos = stop
    return np.concatenate(parts).astype(np.float32)


def pca(x: torch.Tensor, dim: int, whiten: bool) -> torch.Tensor:
    """Rows of this rank's shard projected on the top `dim` principal components of ALL ranks' rows.

    The moments (count, sums, XᵀX) are all-reduced in float64, so the components equal a single-process PCA
    of the concatenated shards; whitening divides by each component's standard deviation, then rows are
    L2-normalised (DeepCluster). Returns x's dtype and device.
    """
    d = x.shape[1]
    x64 = x.to(torch.float64)
    moments = torch.cat([x64.new_tensor([x.shape[0]]), x64.sum(0), (x64.T @ x64).flatten()])
    distributed = world_size() > 1
    if distributed:
        dist.all_reduce(moments)
    n = int(moments[0].round().item())
    if n < 2 or not 1 <= dim <= min(d, n):
        raise ConfigError(f"pseudo.pca={dim} must be in [1, min(feature dimension {d}, number of images {n})] "
                          "(and PCA needs at least 2 images); lower pseudo.pca or set it to null")
    mean = moments[1:1 + d] / n
    cov = (moments[1 + d:].view(d, d) - n * torch.outer(mean, mean)) / (n - 1)
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)  # ascending
    values, vectors = values.flip(0)[:dim].clamp_min(0), vectors.flip(1)[:, :dim]
    # each component's sign is arbitrary: make its largest-magnitude entry positive
    pivots = vectors.abs().argmax(0)
    vectors = vectors * vectors[pivots, torch.arange(dim, device=x.device)].sign()
    projection = vectors / (values + 1e-6 * values[0] + 1e-30).sqrt() if whiten else vectors
    if distributed:  # the moments are identical everywhere; this makes the eigensolver's output so too
        dist.broadcast(projection, 0)
    return F.normalize((x64 - mean) @ projection, dim=1).to(x.dtype)
