"""Evaluation of a finetuned classifier: SA, RA (PGD-20) and AA (AutoAttack "standard"); results.json.

Every number is measured on the test split of the finetuning dataset, once, at the end: there is no
selection on the test set. The work is sharded over every rank of the launch in fixed blocks
(eval_blocks.py), each finished block cached in the run folder, so `results.json` is the same on any
number of ranks and a requeued evaluation skips what is done. AutoAttack may be restricted to
`eval.aa_n` test images (it is slow), chosen by a recorded rule (aa_subset.py: a seeded class-stratified
sample by default); SA and RA on that same subset are recorded beside it, so AA ≤ RA ≤ SA can be checked
on identical images. Every accuracy comes with its count and 95 % Wilson interval (stats.py); the
per-image flags go to `flags.npz`, for paired comparisons between runs (tools/report.py --compare). With
`eval.curves`, the gradient-masking curves and checks (masking.py) run on the AutoAttack images too,
through the same blocks and cache: results.json gets `curves` and `checks`, the run folder `curves.png`.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .aa_subset import aa_selection
from .attacks import pgd
from .config import Config, ConfigError, to_yaml
from .data.source import finetune_data, image_source
from .distributed import DistInfo, distributed_session
from .engine.checkpoint import load_checkpoint
from .engine.preemption import StopRequest
from .engine.trainer import uses_channels_last
from .eval_blocks import CACHE, EvaluationStopped, FlagCache, file_sha256, sharded_flags
from .faults import fault_point
from .folder_lock import folder_lock
from .masking import masking_checks, robustness_curves
from .models import BACKBONES, Classifier
from .rng import StepRandom, step_seed
from .run_folder import RunFolder, save_array, write_json
from .stats import accuracy_interval

RESULTS = "results.json"
CURVES = "curves.png"


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """The classifier a finetuning run wrote (`classifier.pt`), in eval mode: [0, 1] images → logits.
    Also its export (tools/export.py): `classifier.safetensors` or the export folder, read without running code."""
    if str(path).endswith(".safetensors") or (Path(path) / "export.json").is_file():
        from .export import load_exported

        return load_exported(path, device)
    return _read_classifier(path, device)[0]


def _read_classifier(path: str | Path, device) -> tuple[Classifier, dict]:
    state = load_checkpoint(Path(path), device)
    if "classifier" not in state:
        raise ConfigError(f"{path} is not a finetuned classifier (no 'classifier' entry); a pretraining checkpoint "
                          "must be finetuned first: tools/finetune.py finetune.checkpoint=<it>")
    meta = state["classifier"]
    if not state.get("finished", False):
        print(f"[evaluate] warning: {path} is from an unfinished finetuning run (step {state.get('step')})",
              file=sys.stderr, flush=True)
    encoder = BACKBONES[meta["arch"]](meta["width"], tuple(meta["branches"]))
    model = Classifier(encoder, meta["num_classes"], meta["branch"])
    # With a validation split the served weights are the best epoch's, kept in the objective's state.
    weights = state["objective"]["best"]["model"] if state.get("selected") else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"{path}: its weights do not fit the network it describes ({meta['arch']}, width "
                          f"{meta['width']}): {str(e).splitlines()[0]}; the file is damaged or not ours") from None
    return model.to(device).eval(), state


def percent(flags) -> float:
    flags = np.asarray(flags)
    return round(100.0 * float(flags.mean()), 2) if flags.size else float("nan")


def pgd_block(model, eps: float, step_size: float, steps: int, seed: int):
    """Clean and PGD correctness of a block; the random start of an image comes from (seed, its index)."""
    def run(x, y, block_indices, start):
        random = StepRandom(x.device, seed).keyed(block_indices)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        x_adv = pgd(lambda z: F.cross_entropy(model(z), y), x, eps, step_size, steps, True, random).x_adv
        with torch.no_grad():
            robust = model(x_adv).argmax(1) == y
        return torch.stack([clean, robust])

    return run


def robust_accuracy(model, source, indices, eps, step_size, steps, batch_size, image_size, seed,
                    dist_info: DistInfo) -> dict[str, float]:
    """{"SA", "RA"} in percent over the images `indices` of `source`, sharded over the ranks; the same on
    every rank."""
    flags = sharded_flags("pgd", pgd_block(model, eps, step_size, steps, seed), 2, source, indices,
                          batch_size, image_size, dist_info, log=lambda _: None)
    return {"SA": percent(flags[0]), "RA": percent(flags[1])}


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
    return correct_within_ball(model, x, x_adv, y, eps, batch_size, "AutoAttack").cpu()


def correct_within_ball(model, x, x_adv, y, eps: float, batch_size: int, attack: str) -> torch.Tensor:
    """Per-image correctness on an attack's output, refusing points outside the L∞ ε-ball (a library's bug
    would otherwise be reported as a robustness number)."""
    if (x_adv - x).abs().max() > eps + 1e-5:
        raise RuntimeError(f"{attack} returned points outside the ε-ball; refusing to report them")
    with torch.no_grad():
        return torch.cat([model(chunk).argmax(1) for chunk in x_adv.split(batch_size)]).eq(y)


def autoattack_block(model, eps: float, seed: int):
    """AutoAttack on one block, seeded by (seed, the block's first position): independent of the sharding."""
    def run(x, y, block_indices, start):
        return autoattack_flags(model, x, y, eps, len(x), step_seed(seed, start, 2) % 2**31)[None]

    return run


def evaluate(cfg: Config, checkpoint: str | Path | None = None, stop: StopRequest | None = None,
             record_run: bool = True) -> dict | None:
    """Evaluate the classifier (`checkpoint`, `eval.checkpoint` or <out_dir>/classifier.pt) on every rank of
    the launch; rank 0 writes results.json. Returns the results (None when stopped by the launcher)."""
    e, a, out = cfg.eval, cfg.attack, Path(cfg.out_dir)
    path = Path(checkpoint or e.checkpoint or out / "classifier.pt")
    if not path.is_file():
        raise FileNotFoundError(f"classifier {path} does not exist; finetune first (tools/finetune.py) "
                                "or set eval.checkpoint")
    with distributed_session(cfg.train.device) as info, folder_lock(out, info):
        def log(message: str) -> None:
            if info.is_main:
                print(f"[evaluate] {message}", flush=True)

        model, state = _read_classifier(path, info.device)
        if uses_channels_last(cfg, info.device):  # a layout change: the attacks' convolutions run faster
            model = model.to(memory_format=torch.channels_last)
        meta = state["classifier"]
        data = finetune_data(cfg, "test", e.beton)
        source = image_source(data)
        n = len(source)
        aa_index, subset = aa_selection(e, source) if e.autoattack or e.curves else (np.zeros(0, np.int64), None)
        aa_n = len(aa_index) if e.autoattack else 0
        log(f"{meta['method']} + {meta['finetune'].upper()} on {meta['dataset']} test ({n} images) on "
            f"{info.world_size} rank(s): SA, RA (PGD-{a.eval_steps}, ε={a.eps * 255:.3g}/255)"
            + (f", AA on {aa_n} ({subset['rule']}, {subset['classes']} classes)" if aa_n else ""))
        key = {"classifier": str(path.resolve()), "sha256": file_sha256(path), "dataset": meta["dataset"],
               "split": "test", "n": n, "beton": e.beton, "image_size": meta["image_size"], "eps": a.eps,
               "step_size": a.step_size, "pgd_steps": a.eval_steps, "seed": e.seed, "block": e.batch_size,
               "aa_images": subset and subset["sha256"]}
        restart = (out / CACHE).is_dir()
        cache = FlagCache(out / CACHE, key, info, log)  # refuses another classifier's folder before anything is written
        run = RunFolder(out, "evaluate", info) if record_run else None
        if run is not None:
            run.start(to_yaml(cfg), {"restart": True} if restart else None)
        t0 = time.perf_counter()
        common = dict(source=source, block_size=e.batch_size, image_size=meta["image_size"], dist_info=info,
                      cache=cache, stop=stop, log=log)
        try:
            sa_ra = sharded_flags(f"pgd{a.eval_steps}", pgd_block(model, a.eps, a.step_size, a.eval_steps, e.seed),
                                  2, indices=range(n), **common)
            aa = None
            if aa_n:
                aa = sharded_flags("autoattack", autoattack_block(model, a.eps, e.seed), 1,
                                   indices=aa_index, **common)[0]
            curves = None
            if e.curves:  # on the AutoAttack images (their RA and AA are then compared on the same images)
                def measure(name, block, rows):
                    if name == f"pgd{a.eval_steps}":  # the RA just measured: its flags on these images
                        return sa_ra[:, aa_index]
                    return sharded_flags(name, block, rows, indices=aa_index, **common)

                curves = robustness_curves(model, measure, a.eps, a.step_size, a.eval_steps, e.seed,
                                           e.square_queries)
        except EvaluationStopped:
            log("stopped on the launcher's signal; finished blocks are cached, the requeued job resumes there")
            if run is not None:
                run.finish(False, stopped_by_signal=True)
            return None
        clean, robust = sa_ra
        results = {"dataset": meta["dataset"], "method": meta["method"], "finetune": meta["finetune"],
                   "SA": percent(clean), "RA": percent(robust), "AA": None, "n_test": n,
                   "intervals": {"SA": accuracy_interval(clean), "RA": accuracy_interval(robust)},
                   "attack": {"norm": "Linf", "eps": a.eps, "eps_255": round(a.eps * 255, 4), "step_size": a.step_size,
                              "pgd_steps": a.eval_steps, "random_start": True,
                              "autoattack": "standard" if aa_n else None, "aa_n": aa_n or None},
                   "checkpoint": str(path.resolve()), "pretrained": meta["pretrained"],
                   "epoch": (state.get("selected") or {}).get("epoch", state.get("epoch")),
                   "selected_by": "val_RA" if state.get("selected") else "last_epoch",
                   "world_size": info.world_size}
        if subset is not None:  # the AutoAttack images (and the curves'): SA and RA on them too, AA when it ran
            on_subset = {"SA": clean[aa_index], "RA": robust[aa_index], **({"AA": aa} if aa is not None else {})}
            results["aa_subset"] = {**subset, "AA": None, **{k: percent(v) for k, v in on_subset.items()},
                                    "intervals": {k: accuracy_interval(v) for k, v in on_subset.items()}}
        if aa is not None:
            results["AA"] = percent(aa)
            results["intervals"]["AA"] = accuracy_interval(aa)
        if curves is not None:
            results["curves"] = curves
            results["checks"] = masking_checks(curves, percent(robust[aa_index]),
                                               percent(aa) if aa is not None else None)
            failed = [name for name, check in results["checks"].items() if not check["pass"]]
            log(f"gradient-masking checks on {curves['n']} images: {len(results['checks']) - len(failed)} of "
                f"{len(results['checks'])} pass" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        results["seconds"] = round(time.perf_counter() - t0, 1)
        if info.is_main:
            if curves is not None:
                from .figures import plot_curves  # matplotlib: imported only by runs that draw

                plot_curves([(f"{meta['method']} + {meta['finetune'].upper()}", curves)], out / CURVES)
            save_array({"index": np.arange(n), "clean": clean.astype(bool), "robust": robust.astype(bool),
                        "autoattack": (aa if aa is not None else np.zeros(0, np.uint8)).astype(bool),
                        "aa_index": aa_index},
                       out / "flags.npz")
            fault_point("evaluate.before_results")
            write_json(results, out / RESULTS)
        if run is not None:
            run.finish(True)
        log(f"SA {results['SA']:.2f}  RA {results['RA']:.2f}  AA "
            + ("skipped" if results["AA"] is None else f"{results['AA']:.2f} (on {aa_n})") + f" → {out / RESULTS}")
        return results
