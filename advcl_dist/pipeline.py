"""The whole pipeline: f_pre → pseudo-labels → the method and its baselines → finetune + evaluate.

The stages are planned from what each method declares (`Method.needs`, `Method.post_process`), not from
method names:
  <fpre_method>   pretraining of f_pre (`pipeline.fpre_method`, SimCLR) when a method needs pseudo-labels
                  and `pseudo.fpre` is not given, or a teacher (DeACL); also a baseline when listed
  cluster         ensemble k-means pseudo-labels from f_pre features (unless `pseudo.labels` is given)
  <name>          pretraining of `train.method` and of every `pipeline.baselines` entry (a method or a named
                  variant, e.g. dynacl++), each with the pseudo-labels / teacher it needs
  <name>-cluster, <name>-post
                  a method's declared post-processing (DynACL++): pseudo-labels from its own features, then
                  the post method from its checkpoint; its finetuning reads the post stage's checkpoint
  <name>-<mode>   finetuning (pipeline.finetune: slf / alf / aff) + evaluation → results.json
A stage whose outputs say it finished is skipped (and the log says so); a stage that failed or was
interrupted runs again, resuming from its own checkpoint. Every stage runs on every rank of the launch
(`torchrun ... tools/pipeline.py`; tools/submit.py sends each stage as its own job). The table of every
results.json goes to summary.md and summary.json.
"""
from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cluster import CLUSTERS, PSEUDO_LABELS, cluster
from .config import Config, ConfigError, to_yaml, with_overrides
from .distributed import distributed_session
from .engine import CHECKPOINT, pretrain
from .engine.preemption import StopRequest
from .evaluate import RESULTS
from .faults import fault_point
from .finetune import finetune
from .folder_lock import folder_lock
from .methods import METHODS, NEED_FIELDS, method_values
from .provenance import now
from .run_folder import changed_keys, is_finished, read_json, write_json, write_text


@dataclass
class Stage:
    name: str
    base: Config
    values: dict  # dotted keys that turn the pipeline config into this stage's config
    run: Callable[..., object]  # run(cfg, stop=None), on every rank of the launch
    done_when: str  # "finished" (run.json says so) or a file whose presence means done
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads (SLURM chains them with afterok)
    kind: str = "pretrain"  # pretrain | cluster | finetune | evaluate | summary: resources per kind (launch.*)
    graceful: bool = True  # polls the stop request (else a launcher requeues it at once)

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
            return is_finished(self.folder)
        return (self.folder / self.done_when).is_file()


def plan_stages(cfg: Config) -> list[Stage]:
    """The stages `cfg` asks for, in the order they must run."""
    root, p = Path(cfg.out_dir), cfg.pipeline
    runs = {name: method_values(name) for name in dict.fromkeys([cfg.train.method, *p.baselines])}
    stages: list[Stage] = []

    def has(name: str) -> bool:
        return any(s.name == name for s in stages)

    def pretrain_stage(name: str, values: dict, needs: tuple[str, ...] = ()) -> None:
        values = {"out_dir": str(root / name), "pseudo.labels": None, "train.label": name, **values}
        stages.append(Stage(name, cfg, values, pretrain, "finished", needs))

    def needs_of(values: dict) -> frozenset[str]:
        return METHODS[values["train.method"]].needs

    def checkpoint_of(name: str) -> str:
        return str(root / name / CHECKPOINT)

    def fpre_run(given: str | None) -> tuple[str, tuple[str, ...]]:
        """The checkpoint of `pipeline.fpre_method` (f_pre; a teacher), pretrained here unless `given`."""
        if given is not None:
            return given, ()
        if not has(p.fpre_method):
            pretrain_stage(p.fpre_method, runs.get(p.fpre_method, {"train.method": p.fpre_method}))
        return checkpoint_of(p.fpre_method), (p.fpre_method,)

    labels, label_needs = cfg.pseudo.labels, ()
    if labels is None and any("pseudo_labels" in needs_of(v) for v in runs.values()):
        fpre, fpre_needs = fpre_run(cfg.pseudo.fpre)
        stages.append(Stage("cluster", cfg, {"out_dir": str(root / "cluster"), "pseudo.fpre": fpre}, cluster,
                            CLUSTERS, fpre_needs, kind="cluster", graceful=False))
        labels, label_needs = str(root / "cluster" / PSEUDO_LABELS), ("cluster",)
    served = {}  # run name → the stage whose checkpoint its finetuning reads
    for name, values in runs.items():
        method, needs, extra = values["train.method"], (), {}
        if "pseudo_labels" in needs_of(values):
            needs, extra = label_needs, {"pseudo.labels": labels}
        for need, field in NEED_FIELDS.items():
            if need in needs_of(values) and getattr(getattr(cfg, method), field) is None:
                if need != "teacher":
                    raise ConfigError(f"{name} needs {method}.{field} (a checkpoint.pt): give it, or run {method} "
                                      "as the post-processing of the method that declares it")
                teacher, teacher_needs = fpre_run(None)  # ours: pseudo.fpre may be a torchvision state dict
                needs, extra = needs + teacher_needs, {**extra, f"{method}.{field}": teacher}
        if not has(name):
            pretrain_stage(name, {**values, **extra}, needs)
        served[name] = name
        post = METHODS[method].post_process(with_overrides(cfg, values, f"{name}'s options"))
        if post is not None:
            # e.g. DynACL++: pseudo-labels from the method's own features, then `post.method` from its checkpoint
            ks = {"pseudo.ks": list(post.ks)}
            stages.append(Stage(f"{name}-cluster", cfg, {"out_dir": str(root / f"{name}-cluster"),
                                                         "pseudo.fpre": checkpoint_of(name), **ks},
                                cluster, CLUSTERS, (name,), kind="cluster", graceful=False))
            pretrain_stage(f"{name}-post", {"train.method": post.method, "train.label": name, **ks,
                                            f"{post.method}.init": checkpoint_of(name),
                                            "pseudo.labels": str(root / f"{name}-cluster" / PSEUDO_LABELS)},
                           (f"{name}-cluster",))
            served[name] = f"{name}-post"
    for name, source in served.items():
        for mode in p.finetune:
            values = {"out_dir": str(root / f"{name}-{mode}"), "finetune.mode": mode,
                      "finetune.checkpoint": checkpoint_of(source)}
            stages.append(Stage(f"{name}-{mode}", cfg, values, finetune, RESULTS, (source,), kind="finetune"))
    return stages


def run_pipeline(cfg: Config, stop: StopRequest | None = None) -> list[dict] | None:
    """Run every stage not yet finished on every rank of the launch, then write and return the summary rows
    (None when the launcher's stop request ended a stage early)."""
    root = Path(cfg.out_dir)
    stages = plan_stages(cfg)
    with distributed_session(cfg.train.device) as info, folder_lock(root, info):
        main = info.is_main
        status_path = root / "pipeline.json"
        status = read_json(status_path) or {}

        def record() -> None:
            if main:
                write_json(status, status_path)

        if main:
            root.mkdir(parents=True, exist_ok=True)
            write_text(to_yaml(cfg), root / "config.yaml")
            print(f"[pipeline] {len(stages)} stages → {root}: {', '.join(s.name for s in stages)}", flush=True)
        for stage in stages:
            entry = status.setdefault(stage.name, {})
            if stage.is_done():
                if main:
                    print(f"[pipeline] {stage.name}: already done ({stage.folder}); skipping", flush=True)
                    _warn_if_changed(stage)
                entry["status"] = "done"
                record()
                continue
            if main:
                print(f"[pipeline] {stage.name}: running → {stage.folder}", flush=True)
            entry.update(status="running", start=now(), end=None, error=None)
            record()
            t0 = time.perf_counter()
            try:
                stage.run(stage.cfg, stop=stop)
            except BaseException as e:
                entry.update(status="failed", end=now(), error=f"{type(e).__name__}: {e}",
                             traceback=traceback.format_exc(limit=20))
                record()
                if main:
                    print(f"[pipeline] {stage.name}: FAILED ({type(e).__name__}: {e}); re-run the same command "
                          "to retry it", flush=True)
                raise
            if not stage.is_done():  # stopped early by the launcher's signal
                entry.update(status="stopped", end=now())
                record()
                return None
            fault_point("pipeline.between_stages")
            entry.update(status="done", end=now(), seconds=round(time.perf_counter() - t0, 1))
            entry.pop("traceback", None)
            record()
        rows = [read_json(s.folder / RESULTS) for s in stages if s.done_when == RESULTS]
        if main:
            write_summary(rows, root, cfg, info.device)
        return rows


def _warn_if_changed(stage: Stage) -> None:
    saved = stage.folder / "config.yaml"
    if saved.is_file():
        changed = changed_keys(saved.read_text(), to_yaml(stage.cfg))
        if changed:
            print(f"[pipeline] warning: {stage.name} was run with a different config ({', '.join(changed)}); "
                  f"its results are kept — delete {stage.folder} to redo it", flush=True)


def summary_table(rows: list[dict]) -> str:
    """Markdown table; when AA ran on a subset, SA / RA / AA on those same images get their own columns. Each
    accuracy shows its Wilson interval when the evaluation recorded one (older results.json: the number alone)."""
    from .report import interval_of, metric_cell  # the reports' one cell formatter

    def cell(result: dict, metric: str) -> str:
        return metric_cell(result[metric], *interval_of(result, metric))

    lines = ["| method | finetune | dataset | SA | RA | AA | AA images | SA / RA / AA on the AA images |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        sub = r.get("aa_subset")
        same = " / ".join(cell(sub, m) for m in ("SA", "RA", "AA")) if sub else "—"
        lines.append(f"| {r['method']} | {r['finetune'].upper()} | {r['dataset']} | {cell(r, 'SA')} | {cell(r, 'RA')} "
                     f"| {cell(r, 'AA')} | {sub['n'] if sub else '—'} | {same} |")
    shown = any(interval_of(result, m)[0] is not None for r in rows for result in (r, r.get("aa_subset") or {})
                for m in ("SA", "RA", "AA"))
    note = ("\n(low–high) = 95 % Wilson interval over the images counted: the test split for SA and RA, the AA "
            "images for AA and the last column.\n")
    return "\n".join(lines) + "\n" + (note if shown else "")


def write_summary(rows: list[dict], root: Path, cfg: Config | None = None, device="cpu") -> None:
    """summary.md / summary.json: the table with intervals, the pipeline's method against each other one on the
    same images (report_compare.py), and with `cfg.pipeline.figures` the figures (summary_figures.py) it links."""
    table = summary_table(rows)
    note = ""
    if rows:
        first, steps = rows[0], rows[0]["attack"]["pgd_steps"]
        chosen = ("the epoch with the best robust accuracy on a split held out of the training set"
                  if any(r.get("selected_by") == "val_RA" for r in rows) else "the last epoch of every run")
        note = (f"Accuracies in % on the test split ({first['n_test']} images); RA = PGD-{steps}, "
                f"AA = AutoAttack standard; L∞ ε = {first['attack']['eps_255']}/255. Reported: {chosen} "
                "(no selection on the test set).\n")
    figures = ""
    if cfg is not None and cfg.pipeline.figures and rows:
        from .summary_figures import write_figures  # matplotlib, scikit-learn: imported only to draw

        written = write_figures(rows, root, cfg, cfg.pipeline.tsne_n, device)
        figures = "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in written)
    paired = ""
    if len({r["method"] for r in rows}) > 1:
        from .report_compare import against_main

        paired = "\n" + against_main(root, rows[0]["method"])
    write_text(f"# Results — {root}\n\n{table}\n{note}{paired}{figures}", root / "summary.md")
    write_json({"rows": rows, "written": now()}, root / "summary.json")
    print(table, end="", flush=True)
