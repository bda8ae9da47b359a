"""The whole AdvCL pipeline in one process: f_pre → pseudo-labels → AdvCL → finetune + evaluate.

Stages, each in its own folder under `out_dir`:
  simclr          SimCLR pretraining: f_pre for the clustering, and the SimCLR baseline
  cluster         ensemble k-means pseudo-labels from f_pre features
  advcl           AdvCL pretraining with those pseudo-labels
  supervised_at   the supervised adversarial-training baseline (when listed in pipeline.baselines)
  <method>-<mode> finetuning (pipeline.finetune: slf / alf / aff) + evaluation → results.json
A stage whose outputs say it finished is skipped (and the log says so); a stage that failed
or was interrupted runs again, resuming from its own checkpoint. The table of every
results.json goes to summary.md and summary.json.
"""
from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cluster import CLUSTERS, PSEUDO_LABELS, cluster
from .config import Config, to_yaml, with_overrides
from .engine import CHECKPOINT, pretrain
from .engine.checkpoint import write_json, write_text
from .engine.run_info import now
from .engine.trainer import changed_keys
from .evaluate import RESULTS
from .finetune import finetune


@dataclass
class Stage:
    name: str
    base: Config
    values: dict  # dotted keys that turn the pipeline config into this stage's config
    run: Callable[[Config], object]
    done_when: str  # "finished" (run.json says so) or a file whose presence means done
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads (SLURM chains them with afterok)
    multi_rank: bool = False  # runs on every rank of a launch (pretraining, clustering), else on one process

    @property
    def folder(self) -> Path:
        return Path(self.values["out_dir"])

    @property
    def cfg(self) -> Config:
        # Derived when needed, not when planned: it names files (pseudo-labels, checkpoints)
        # that earlier stages have yet to write, and validation checks that they exist.
        return with_overrides(self.base, self.values)

    def is_done(self) -> bool:
        if self.done_when == "finished":
            path = self.folder / "run.json"
            return path.is_file() and json.loads(path.read_text()).get("finished") is True
        return (self.folder / self.done_when).is_file()


def plan_stages(cfg: Config) -> list[Stage]:
    """The stages `cfg` asks for, in the order they must run."""
    root, p = Path(cfg.out_dir), cfg.pipeline
    stages: list[Stage] = []

    def pretrain_stage(method: str, needs: tuple[str, ...] = (), **extra) -> None:
        values = {"train.method": method, "out_dir": str(root / method), "pseudo.labels": None, **extra}
        stages.append(Stage(method, cfg, values, pretrain, "finished", needs, multi_rank=True))

    fpre, fpre_needs = cfg.pseudo.fpre, ()
    if fpre is None or "simclr" in p.baselines:
        pretrain_stage("simclr")
        if fpre is None:
            fpre, fpre_needs = str(root / "simclr" / CHECKPOINT), ("simclr",)
    labels, label_needs = cfg.pseudo.labels, ()
    if labels is None:
        stages.append(Stage("cluster", cfg, {"out_dir": str(root / "cluster"), "pseudo.fpre": fpre}, cluster, CLUSTERS,
                            fpre_needs, multi_rank=True))
        labels, label_needs = str(root / "cluster" / PSEUDO_LABELS), ("cluster",)
    pretrain_stage("advcl", label_needs, **{"pseudo.labels": labels})
    if "supervised_at" in p.baselines:
        pretrain_stage("supervised_at")
    for method in ["advcl", *p.baselines]:
        for mode in p.finetune:
            values = {"out_dir": str(root / f"{method}-{mode}"), "finetune.mode": mode,
                      "finetune.checkpoint": str(root / method / CHECKPOINT)}
            stages.append(Stage(f"{method}-{mode}", cfg, values, finetune, RESULTS, (method,)))
    return stages


def run_pipeline(cfg: Config) -> list[dict]:
    """Run every stage not yet finished, then write and return the summary rows."""
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_text(to_yaml(cfg), root / "config.yaml")
    stages = plan_stages(cfg)
    status_path = root / "pipeline.json"
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    print(f"[pipeline] {len(stages)} stages → {root}: {', '.join(s.name for s in stages)}", flush=True)
    for stage in stages:
        entry = status.setdefault(stage.name, {})
        if stage.is_done():
            print(f"[pipeline] {stage.name}: already done ({stage.folder}); skipping", flush=True)
            _warn_if_changed(stage)
            entry["status"] = "done"
            write_json(status, status_path)
            continue
        print(f"[pipeline] {stage.name}: running → {stage.folder}", flush=True)
        entry.update(status="running", start=now(), end=None, error=None)
        write_json(status, status_path)
        t0 = time.perf_counter()
        try:
            stage.run(stage.cfg)
        except BaseException as e:
            entry.update(status="failed", end=now(), error=f"{type(e).__name__}: {e}",
                         traceback=traceback.format_exc(limit=20))
            write_json(status, status_path)
            print(f"[pipeline] {stage.name}: FAILED ({type(e).__name__}: {e}); re-run the same command to retry it",
                  flush=True)
            raise
        entry.update(status="done", end=now(), seconds=round(time.perf_counter() - t0, 1))
        entry.pop("traceback", None)
        write_json(status, status_path)
    rows = [json.loads((s.folder / RESULTS).read_text()) for s in stages if s.done_when == RESULTS]
    write_summary(rows, root)
    return rows


def _warn_if_changed(stage: Stage) -> None:
    saved = stage.folder / "config.yaml"
    if saved.is_file():
        changed = changed_keys(saved.read_text(), to_yaml(stage.cfg))
        if changed:
            print(f"[pipeline] warning: {stage.name} was run with a different config ({', '.join(changed)}); "
                  f"its results are kept — delete {stage.folder} to redo it", flush=True)


def summary_table(rows: list[dict]) -> str:
    """Markdown table; when AA ran on a subset, SA / RA / AA on those same images get their own columns."""
    lines = ["| method | finetune | dataset | SA | RA | AA | AA images | SA / RA / AA on the AA images |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        sub = r.get("aa_subset")
        aa = "—" if r["AA"] is None else f"{r['AA']:.2f}"
        same = f"{sub['SA']:.2f} / {sub['RA']:.2f} / {sub['AA']:.2f}" if sub else "—"
        lines.append(f"| {r['method']} | {r['finetune'].upper()} | {r['dataset']} | {r['SA']:.2f} | {r['RA']:.2f} "
                     f"| {aa} | {sub['n'] if sub else '—'} | {same} |")
    return "\n".join(lines) + "\n"


def write_summary(rows: list[dict], root: Path) -> None:
    table = summary_table(rows)
    note = ""
    if rows:
        first, steps = rows[0], rows[0]["attack"]["pgd_steps"]
        chosen = ("the epoch with the best robust accuracy on a split held out of the training set"
                  if any(r.get("selected_by") == "val_RA" for r in rows) else "the last epoch of every run")
        note = (f"Accuracies in % on the test split ({first['n_test']} images); RA = PGD-{steps}, "
                f"AA = AutoAttack standard; L∞ ε = {first['attack']['eps_255']}/255. Reported: {chosen} "
                "(no selection on the test set).\n")
    write_text(f"# Results — {root}\n\n{table}\n{note}", root / "summary.md")
    write_json({"rows": rows, "written": now()}, root / "summary.json")
    print(table, end="", flush=True)
