"""Evaluation of a finetuned classifier: SA, RA (PGD-20) and AA (AutoAttack "standard"); results.json.

Every number is measured on the test split of the finetuning dataset, once, at the end: there
is no selection on the test set. AutoAttack may be restricted to the first `eval.aa_n` test
images (it is slow); SA and RA on that same subset are recorded beside it, so AA ≤ RA ≤ SA can
be checked on identical images.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .attacks import pgd
from .config import Config, ConfigError
from .data import get_dataset, ordered_batches
from .distributed import pick_device
from .engine.checkpoint import load_checkpoint, write_json
from .models import BACKBONES, Classifier

RESULTS = "results.json"


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """The classifier a finetuning run wrote (`classifier.pt`), in eval mode: [0, 1] images → logits."""
    return _read_classifier(path, device)[0]


def _read_classifier(path: str | Path, device) -> tuple[Classifier, dict]:
    state = load_checkpoint(Path(path), device)
    if "classifier" not in state:
        raise ConfigError(f"{path} is not a finetuned classifier (no 'classifier' entry); a pretraining checkpoint "
                          "must be finetuned first: tools/finetune.py finetune.checkpoint=<it>")
    meta = state["classifier"]
    if not state.get("finished", False):
        print(f"[evaluate] warning: {path} is from an unfinished finetuning run (epoch {state.get('epoch')})",
              file=sys.stderr, flush=True)
    encoder = BACKBONES[meta["arch"]](meta["width"], tuple(meta["branches"]))
    model = Classifier(encoder, meta["num_classes"], meta["branch"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def correct_flags(model: torch.nn.Module, dataset, eps: float, step_size: float, steps: int, batch_size: int,
                  image_size: int, seed: int, keep: int = 0):
    """Per-image clean and PGD correctness over `dataset` in index order, and its first `keep` images."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    clean, robust, kept_x, kept_y = [], [], [], []
    for x, y in ordered_batches(dataset, batch_size, image_size, device):
        with torch.no_grad():
            clean.append(model(x).argmax(1) == y)
        x_adv = pgd(lambda z, y=y: F.cross_entropy(model(z), y), x, eps, step_size, steps, True, generator).x_adv
        with torch.no_grad():
            robust.append(model(x_adv).argmax(1) == y)
        if sum(len(t) for t in kept_y) < keep:
            kept_x.append(x)
            kept_y.append(y)
    x_keep = torch.cat(kept_x)[:keep] if kept_x else None
    y_keep = torch.cat(kept_y)[:keep] if kept_y else None
    return torch.cat(clean).cpu(), torch.cat(robust).cpu(), x_keep, y_keep


def percent(flags: torch.Tensor) -> float:
    return round(100.0 * flags.float().mean().item(), 2)


def robust_accuracy(model, dataset, eps, step_size, steps, batch_size, image_size, seed) -> dict[str, float]:
    """{"SA", "RA"} in percent over `dataset`."""
    clean, robust, _, _ = correct_flags(model, dataset, eps, step_size, steps, batch_size, image_size, seed)
    return {"SA": percent(clean), "RA": percent(robust)}


def autoattack_flags(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int,
                     seed: int) -> torch.Tensor:
    """Per-image correctness under AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square), L∞ `eps`."""
    from pyautoattack import AutoAttack  # the reference implementation, repackaged; imported only when used

    device = x.device
    attack = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device, seed=seed)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[evaluate] AA %(message)s"))
    attack.logger.addHandler(handler)
    attack.logger.setLevel(logging.DEBUG)
    try:
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        attack.logger.removeHandler(handler)
    if (x_adv - x).abs().max() > eps + 1e-5:
        raise RuntimeError("AutoAttack returned points outside the ε-ball; refusing to report them")
    with torch.no_grad():
        return torch.cat([model(chunk).argmax(1) for chunk in x_adv.split(batch_size)]).eq(y).cpu()


def evaluate(cfg: Config, checkpoint: str | Path | None = None) -> dict:
    """Evaluate the classifier (`checkpoint`, `eval.checkpoint` or <out_dir>/classifier.pt); write results.json."""
    e, a, out = cfg.eval, cfg.attack, Path(cfg.out_dir)
    path = Path(checkpoint or e.checkpoint or out / "classifier.pt")
    if not path.is_file():
        raise FileNotFoundError(f"classifier {path} does not exist; finetune first (tools/finetune.py) "
                                "or set eval.checkpoint")
    device = pick_device(cfg.train.device)
    model, state = _read_classifier(path, device)
    meta = state["classifier"]
    root = cfg.finetune.root if cfg.finetune.root is not None else cfg.data.root
    test = get_dataset(meta["dataset"], "test", root, cfg.data.download)
    n = len(test)
    aa_n = min(e.aa_n or n, n) if e.autoattack else 0
    print(f"[evaluate] {meta['method']} + {meta['finetune'].upper()} on {meta['dataset']} test ({n} images): "
          f"SA, RA (PGD-{a.eval_steps}, ε={a.eps * 255:.3g}/255)" + (f", AA on {aa_n}" if aa_n else ""), flush=True)
    t0 = time.perf_counter()
    clean, robust, x_aa, y_aa = correct_flags(model, test, a.eps, a.step_size, a.eval_steps, e.batch_size,
                                              meta["image_size"], e.seed, keep=aa_n)
    results = {"dataset": meta["dataset"], "method": meta["method"], "finetune": meta["finetune"],
               "SA": percent(clean), "RA": percent(robust), "AA": None, "n_test": n,
               "attack": {"norm": "Linf", "eps": a.eps, "eps_255": round(a.eps * 255, 4), "step_size": a.step_size,
                          "pgd_steps": a.eval_steps, "random_start": True, "autoattack": "standard" if aa_n else None,
                          "aa_n": aa_n or None},
               "checkpoint": str(path.resolve()), "pretrained": meta["pretrained"],
               "epoch": state.get("selected_epoch", state.get("epoch")),
               "selected_by": "val_RA" if state.get("best") else "last_epoch"}
    if aa_n:
        aa = autoattack_flags(model, x_aa, y_aa, a.eps, e.batch_size, e.seed)
        results["AA"] = percent(aa)
        results["aa_subset"] = {"n": aa_n, "SA": percent(clean[:aa_n]), "RA": percent(robust[:aa_n]),
                                "AA": percent(aa)}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(results, out / RESULTS)
    print(f"[evaluate] SA {results['SA']:.2f}  RA {results['RA']:.2f}  AA "
          + ("skipped" if results["AA"] is None else f"{results['AA']:.2f} (first {aa_n})") + f" → {out / RESULTS}",
          flush=True)
    return results
