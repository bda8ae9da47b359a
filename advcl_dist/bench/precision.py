"""`tools/bench.py precision`: are the attacks as strong under bf16 autocast as in fp32?

On a GPU the trainer runs AdvCL's two attacks under bf16 autocast (the loss and its input gradient pass
through bf16 convolutions); the authors ran fp32. A gradient rounded to bf16 can point elsewhere, giving
a weaker δ and so less robustness for the same training. Three comparisons, each on the same weights,
the same inputs and the same random starts, so that the precision is the only difference:

  δ       AdvCL's contrastive attack (`pgd` BN branch) on one batch of digits train images
  δ_ce    its pseudo-label CE attack (`pgd_ce` branch) on the same batch (both as AdvCL.attacks runs them)
  PGD-20  the robust accuracy (RA) of one classifier over the digits test images

A δ found in either precision is scored by the same fp32 objective: its gain is the fp32 loss at x + δ
minus the fp32 loss at x, and an image counts as robust when the fp32 forward still classifies x + δ
correctly. The encoder is AdvCL trained here for --train-steps steps (batch 128, its digit classes mod K as
the pseudo-labels: the attacks need trained heads, not good clusters); the classifier is the eval bench's
(plain cross-entropy). Both are cached under --cache. The threat model is the paper's (ε 8/255, step
2/255, 5 PGD steps for δ and δ_ce, PGD-20 for RA) with the demo's digits views (hf_radius 2, K ≤ 100).
On CUDA, "fp32" is true fp32: TF32 convolutions and matmuls are turned off; both arms use channels_last.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks import pgd
from ..config import load_config
from ..data import get_dataset
from ..data.augment import crop_flip_view, to_float
from ..distributed import pick_device
from ..engine.checkpoint import load_checkpoint, save_checkpoint
from ..engine.objective import StepContext
from ..losses import pseudo_label_ce
from ..methods import build_method, split_views
from ..methods.simclr import simclr_views
from ..models import views_plan
from ..rng import StepRandom
from ..views import high_frequency
from .evaluation import _classifier, eval_classifier
from .output import check_json, write_report

TRAIN_BATCH = 128  # of the encoder's AdvCL training steps
DIGITS_OVERRIDES = ["data.name=digits", "advcl.hf_radius=2.0", "pseudo.ks=[2,10,50,100]", "attack.eps_ramp_epochs=2"]


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def digits_at(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits images (uint8) resized to `size` px, and their labels."""
    data = get_dataset("digits", split)
    images = data.images
    if images.shape[-1] != size:
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images, data.labels


def advcl_method(width: int, size: int, cache: Path, device: torch.device):
    """AdvCL bound to the digits train split, with its classes mod K as pseudo-labels (one .npy per cache)."""
    _, labels = digits_at("train", 32)
    ks = load_config(None, DIGITS_OVERRIDES).pseudo.ks
    path = Path(cache) / "precision-pseudo-labels.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.stack([labels.numpy() % k for k in ks], axis=1))
    cfg = load_config(None, [*DIGITS_OVERRIDES, f"model.width={width}", f"views.size={size}", f"pseudo.labels={path}"])
    return build_method(cfg, len(labels), device)


def trained_encoder(method, steps: int, seed: int, cache: Path) -> tuple[torch.nn.Module, dict]:
    """AdvCL trained `steps` SGD steps in fp32 from seed `seed` (the ε ramp of the demo against a collapse); cached."""
    device, cfg = method.device, method.cfg
    path = Path(cache) / f"precision-advcl-r18w{cfg.model.width}-{cfg.views.size}px-t{steps}-s{seed}-{device.type}.pt"
    torch.manual_seed(seed)
    model = method.build_model().to(device)
    if path.is_file():
        state = load_checkpoint(path, device)
        model.load_state_dict(state["model"])
        return model, state["facts"]
    images, _ = digits_at("train", cfg.views.size)
    images = images.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    random, g = StepRandom(device, seed), torch.Generator().manual_seed(seed)
    per_epoch = len(images) // TRAIN_BATCH
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(images), generator=g)
        idx = order[(step % per_epoch) * TRAIN_BATCH:][:TRAIN_BATCH].to(device)
        ctx = StepContext(step=step, epoch=step // per_epoch, total_steps=steps, steps_per_epoch=per_epoch,
                          random=random.reseed(step), model=model, module=model, images=images[idx],
                          labels=torch.full_like(idx, -1), indices=idx)
        out = method.training_step(ctx)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    facts = {"arch": "resnet18", "width": cfg.model.width, "size": cfg.views.size, "train_steps": steps,
             "train_batch": TRAIN_BATCH, "seed": seed, "device": device.type,
             "train_seconds": round(time.perf_counter() - t0, 1), "last_loss": out.loss.item() if steps else None}
    save_checkpoint({"model": model.state_dict(), "facts": facts}, path)
    return model, facts


def attack_batch(method, batch: int, seed: int) -> dict:
    """One batch of digits train images: x, the clean views (t1, t2, x_h), fp32, and the pseudo-labels."""
    device, v = method.device, method.cfg.views
    images, _ = digits_at("train", v.size)
    batch = min(batch, len(images))
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:batch]
    chosen, random = images[idx].to(device), StepRandom(device, seed).reseed(0)
    x = crop_flip_view(chosen, random, size=v.size, padding=v.padding)
    t1, t2 = simclr_views(chosen, random, v)
    x_h = high_frequency(x, method.settings.hf_radius)
    return {"x": x, "clean": torch.cat([t1, t2, x_h]), "pseudo": method.pseudo_labels[idx.to(device)], "seed": seed}


def fp32_losses(method, model, batch: dict, x_con: torch.Tensor, x_ce: torch.Tensor) -> tuple[float, float]:
    """The contrastive loss at `x_con` and the pseudo-label CE at `x_ce`, in fp32, as the attacks define them."""
    b = batch["x"].shape[0]
    with torch.no_grad():
        z_clean = split_views(model(batch["clean"], views_plan(("normal",) * 3, b))["proj"], 3)
        con = method.contrastive(torch.cat([model(x_con, (("pgd", b),))["proj"][:, None], z_clean], dim=1))
        ce = pseudo_label_ce(model(x_ce, (("pgd_ce", b),))["pseudo_logits"], batch["pseudo"])
    return float(con), float(ce)


def run_attacks(method, model, batch: dict, bf16: bool) -> dict:
    """δ and δ_ce as AdvCL.attacks makes them (full ε), under bf16 autocast or not; gains scored in fp32."""
    x, b = batch["x"], batch["x"].shape[0]
    random = StepRandom(x.device, batch["seed"]).reseed(1)  # the same random starts in both precisions
    with autocast(x.device, bf16):
        result = method.attacks(model, x, batch["clean"], batch["pseudo"], random)
    at_x = fp32_losses(method, model, batch, x, x)
    at_adv = fp32_losses(method, model, batch, result.x_adv[:b], result.x_adv[b:])
    return {"x_adv": result.x_adv, "gain": [a - c for a, c in zip(at_adv, at_x)], "loss_at_x": list(at_x),
            "own_initial_loss": result.initial_loss.tolist(), "own_last_loss": result.last_loss.tolist()}


def compare_attacks(method, model, batch: dict, arms=(False, True)) -> dict:
    """{"delta", "delta_ce"}: each arm's fp32-scored gain, their ratio and how far apart the two x + δ lie."""
    first, second = (run_attacks(method, model, batch, bf16) for bf16 in arms)
    b, eps = batch["x"].shape[0], method.cfg.attack.eps
    out = {}
    for i, name in enumerate(("delta", "delta_ce")):
        rows = slice(i * b, (i + 1) * b)
        diff = (second["x_adv"][rows] - first["x_adv"][rows]).abs().mean().item() / eps
        g1, g2 = first["gain"][i], second["gain"][i]
        out[name] = {"loss_at_x": first["loss_at_x"][i], "gain_ratio": g2 / g1 if g1 else None,
                     "x_adv_diff_over_eps": diff,
                     **{arm: {"gain": run["gain"][i], "own_initial_loss": run["own_initial_loss"][i],
                              "own_last_loss": run["own_last_loss"][i]}
                        for arm, run in zip(("fp32", "bf16"), (first, second))}}
    return out


def robust_flags(model, x: torch.Tensor, y: torch.Tensor, indices, attack, seed: int, bf16: bool) -> torch.Tensor:
    """Per image: does the fp32 forward classify x + δ correctly, δ from PGD (per-image random starts) run under
    bf16 autocast or not."""
    random = StepRandom(x.device, seed).keyed(indices)
    with autocast(x.device, bf16):
        x_adv = pgd(lambda z: F.cross_entropy(model(z).float(), y), x, attack.eps, attack.step_size,
                    attack.eval_steps, attack.random_start, random).x_adv
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).cpu()


def compare_ra(model, images: int, batch: int, attack, seed: int, device: torch.device) -> dict:
    test = get_dataset("digits", "test")
    n = min(images, len(test))
    flags = {"clean": [], "fp32": [], "bf16": []}
    for lo in range(0, n, batch):
        idx = range(lo, min(n, lo + batch))
        x, y = to_float(test.images[lo:idx.stop]).to(device), test.labels[lo:idx.stop].to(device)
        with torch.no_grad():
            flags["clean"].append((model(x).argmax(1) == y).cpu())
        for arm in ("fp32", "bf16"):
            flags[arm].append(robust_flags(model, x, y, idx, attack, seed, arm == "bf16"))
    f = {k: torch.cat(v) for k, v in flags.items()}
    pct = {k: round(100.0 * v.float().mean().item(), 2) for k, v in f.items()}
    return {"images": n, "SA": pct["clean"], "fp32": {"RA": pct["fp32"]}, "bf16": {"RA": pct["bf16"]},
            "ra_diff_pp": round(pct["bf16"] - pct["fp32"], 2), "flags_differ": int((f["fp32"] != f["bf16"]).sum())}


@contextlib.contextmanager
def true_fp32():
    """No TF32 in cuDNN convolutions and cuBLAS matmuls for the duration (PyTorch allows it in convolutions)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def main(args) -> dict:
    check_json(args.json)
    device = pick_device(args.device)
    cache = Path(args.cache)
    t0 = time.perf_counter()
    with true_fp32():
        method = advcl_method(args.width, args.size, cache, device)
        encoder, encoder_facts = trained_encoder(method, args.train_steps, args.seed, cache)
        path, classifier_facts = eval_classifier(args.width, args.train_steps, args.seed, cache)
        classifier = _classifier(args.width)
        classifier.load_state_dict(load_checkpoint(path)["model"])
        classifier = classifier.to(device).eval()
        if device.type == "cuda":
            encoder, classifier = (m.to(memory_format=torch.channels_last) for m in (encoder, classifier))
        encoder.train()  # the attacks run in training, with each BN branch's batch statistics
        batch = attack_batch(method, args.batch, args.seed)
        attacks = compare_attacks(method, encoder, batch)
        ra = compare_ra(classifier, args.images, args.batch, method.cfg.attack, args.seed, device)
    a, cfg = method.cfg.attack, method.cfg
    report = {"bench": "precision", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k != "bench"},
              "config": {"eps": a.eps, "step_size": a.step_size, "steps": a.steps, "eval_steps": a.eval_steps,
                         "ks": list(cfg.pseudo.ks), "hf_radius": cfg.advcl.hf_radius,
                         "fuse_attacks": cfg.advcl.fuse_attacks},
              "attack_batch": batch["x"].shape[0], "encoder": encoder_facts, "classifier": classifier_facts,
              "attacks": attacks, "pgd20": ra, "seconds": round(time.perf_counter() - t0, 1)}
    print(table(report))
    write_report(report, args.json)
    return report


def table(report: dict) -> str:
    a, r = report["attacks"], report["pgd20"]
    lines = ["| comparison | fp32 | bf16 autocast | bf16 vs fp32 | mean abs(x_adv diff) / ε |",
             "|---|---:|---:|---:|---:|"]
    for name, label in (("delta", "δ: contrastive loss gain"), ("delta_ce", "δ_ce: pseudo-label CE gain")):
        row = a[name]
        ratio = f"{row['gain_ratio']:.3f}×" if row["gain_ratio"] is not None else "–"
        lines.append(f"| {label} (batch {report['attack_batch']}) | {row['fp32']['gain']:.4f} | "
                     f"{row['bf16']['gain']:.4f} | {ratio} | {row['x_adv_diff_over_eps']:.3f} |")
    lines.append(f"| PGD-{report['config']['eval_steps']} RA % ({r['images']} images, SA {r['SA']}%) | "
                 f"{r['fp32']['RA']:.2f} | {r['bf16']['RA']:.2f} | {r['ra_diff_pp']:+.2f} pp "
                 f"({r['flags_differ']} images differ) | – |")
    return "\n".join(lines)
