"""`tools/submit.py`: send a stage, the chained pipeline, or a sweep of either to SLURM (or run it here).

Folders under `--output`: one per stage as `tools/pipeline.py` makes them (or one per sweep point),
`logs/<stage>/` for submitit's scripts, pickles and logs, `config.yaml` and `submit.json` (job ids).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from ..config import Config, ConfigError, build_parser, load_config, to_yaml, with_overrides
from ..provenance import now
from ..run_folder import write_json, write_text
from .job import StageJob
from .partition import check_jobs
from .plan import STAGE_NAMES, JobGroup, plan_jobs, preflight, read_sweep, sweep_configs
from .resources import (
    Resources,
    add_resource_arguments,
    make_executor,
    require_sbatch,
    resources_from_args,
    sbatch_script,
)

DEFAULT_CONFIG = "configs/cifar10_advcl.yaml"


def build_submit_parser(description: str) -> argparse.ArgumentParser:
    """The stage CLIs' parser (`--config`, `key=value ...`) plus the cluster's options."""
    parser = argparse.ArgumentParser(description=description, parents=[build_parser(description, add_help=False)],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(config=None)
    parser.add_argument("--stage", choices=STAGE_NAMES, default="pipeline",
                        help="what to run (default %(default)s: SimCLR f_pre → pseudo-labels → AdvCL → finetune "
                             "+ evaluate, each stage its own job chained with afterok)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="run folder on a file system every node sees (default ./runs/<config>-<date>)")
    parser.add_argument("--sweep", default=None, metavar="YAML",
                        help="a grid of overrides (configs/sweeps/): one job array per stage, one folder per point")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, the sbatch scripts and the resources; submit nothing")
    add_resource_arguments(parser)
    return parser


def output_folder(args: argparse.Namespace, name: str) -> Path:
    if any(o.startswith("out_dir=") for o in args.overrides):
        raise ConfigError("set the run folder with --output DIR, not out_dir=")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.output or f"runs/{name}-{stamp}").expanduser().absolute()
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {out}: {probe} is not a writable folder; choose a folder you can write "
                          "to on a file system every node of the cluster sees")
    return out


def main(argv: list[str] | None = None, description: str = __doc__) -> int:
    args = build_submit_parser(description).parse_args(argv)
    try:
        return submit(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def submit(args: argparse.Namespace) -> int:
    resources = resources_from_args(args)
    spec, points = read_sweep(args.sweep) if args.sweep else ({}, [])
    config_path = args.config or spec.get("config") or DEFAULT_CONFIG
    name = Path(args.sweep or config_path).stem
    output = output_folder(args, name)
    base = load_config(config_path, args.overrides)
    if points:
        configs = sweep_configs(base, output, points, args.sweep)
    else:
        configs = [with_overrides(base, {"out_dir": str(output)})]
    if args.stage != "pipeline":
        for cfg in configs:
            preflight(args.stage, cfg)
    groups = plan_jobs(args.stage, configs, resources)
    note = check_partition(args, resources, groups)
    if args.dry_run:
        print_dry_run(args, output, configs, points, groups, note)
        return 0
    output.mkdir(parents=True, exist_ok=True)
    write_text(to_yaml(configs[0] if not points else base), output / "config.yaml")
    if points:
        described = [{"folder": p.folder, "swept": p.swept, "overrides": p.values} for p in points]
        write_json({"sweep": str(args.sweep), "stage": args.stage, "config": config_path, "points": described},
                   output / "sweep.json")
    rows: list[dict] = []
    try:
        run_groups(args.cluster, output, groups, resources.cpus_per_task, rows)
    finally:  # what was queued is recorded even when a later sbatch (or a local job) fails
        record_submission(output, args, rows)
    return 0


def check_partition(args: argparse.Namespace, resources: Resources, groups: list[JobGroup]) -> str | None:
    """SLURM queues a job its partition can never run and leaves it pending forever: refuse it here, before
    the first sbatch. A dry run reports the problem in its plan (and on stderr) instead of failing."""
    if args.cluster != "slurm":
        return None
    if not args.dry_run:
        require_sbatch()
    jobs = [(g.resources, "--nodes" if g.resources.nodes == resources.nodes or g.stages[0].kind == "summary"
             else f"launch.{g.stages[0].kind}_nodes") for g in groups]
    try:
        return check_jobs(jobs, required=not args.dry_run)
    except ConfigError as e:
        if not args.dry_run:
            raise
        print(f"warning: {e}", file=sys.stderr)
        return f"partition check FAILED, a submission would stop here: {e}"


def run_groups(cluster: str, output: Path, groups: list[JobGroup], cpus_per_task: int, rows: list[dict]) -> None:
    """Submit every group not yet done, appending one row per job (array) to `rows`; SLURM chains them
    with dependencies, local/debug wait for each."""
    jobs: dict[str, list] = {}
    for group in groups:
        folders = [str(s.folder) for s in group.stages]
        if all(s.is_done() for s in group.stages):
            print(f"[submit] {group.name}: already done ({', '.join(folders)}); not submitted", flush=True)
            continue
        waits = [jobs[n] for n in group.needs if n in jobs]
        array = len(group.stages) > 1
        dependency = None
        if cluster == "slurm" and waits:
            kind = "aftercorr" if array else "afterok"  # array task i waits for task i of the stage before
            dependency = kind + "".join(f":{w[0].job_id.split('_')[0]}" for w in waits)
        executor = make_executor(cluster, output / "logs" / group.name, group.resources, f"advcl-{group.name}",
                                 dependency)
        calls = [StageJob(stage, cpus_per_task) for stage in group.stages]
        if array:
            with executor.batch():
                submitted = [executor.submit(call) for call in calls]
        else:
            submitted = [executor.submit(calls[0])]
        jobs[group.name] = submitted
        ids = submitted[0].job_id.split("_")[0] + (f" (array of {len(submitted)})" if array else "")
        log = output / "logs" / group.name
        print(f"[submit] {group.name}: job {ids}, {group.resources.describe()}"
              + (f", after {dependency}" if dependency else "") + f"\n         → {folders[0]}"
              + (f" … ({len(folders)} folders)" if array else "") + f"\n         log: {log}/", flush=True)
        rows.append({"stage": group.name, "job_ids": [j.job_id for j in submitted], "dependency": dependency,
                     "folders": folders, "logs": str(log), "resources": group.resources.describe()})
        if cluster != "slurm":
            for job in submitted:  # local jobs die with this process, so wait; a failure stops the chain
                job.results()
            print(f"[submit] {group.name}: done", flush=True)


def record_submission(output: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    path = output / "submit.json"
    history = json.loads(path.read_text()) if path.is_file() else {"submissions": []}
    history["submissions"].append({"time": now(), "argv": sys.argv, "cluster": args.cluster, "stage": args.stage,
                                   "jobs": rows})
    write_json(history, path)
    if args.cluster == "slurm" and rows:
        print(f"[submit] {len(rows)} job(s) queued; watch them with squeue -u $USER; job ids in {path}", flush=True)


def print_dry_run(args, output: Path, configs: list[Config], points, groups: list[JobGroup],
                  note: str | None = None) -> None:
    print(f"# dry run: nothing is submitted\n# output: {output}\n" + (f"# {note}\n" if note else "")
          + "# resolved config"
          + (" of the first sweep point" if points else "") + ":")
    print(to_yaml(configs[0]))
    for p in points:
        print(f"# sweep point {p.folder}: {json.dumps(p.swept)}")
    if points and points[0].common:
        print(f"# every point: {json.dumps(points[0].common)}")
    for group in groups:
        print(f"\n# ---- job {group.name}: {group.resources.describe()}"
              + (f"; waits for {', '.join(group.needs)}" if group.needs else "")
              + (f"; array of {len(group.stages)}" if len(group.stages) > 1 else "")
              + f"\n# folder: {group.stages[0].folder}")
        if args.cluster == "slurm":
            needs = ":".join(f"<{n}>" for n in group.needs)
            dependency = (("aftercorr:" if len(group.stages) > 1 else "afterok:") + needs) if needs else None
            print(sbatch_script(output / "logs" / group.name, group.resources, f"advcl-{group.name}", dependency,
                                len(group.stages)))
        else:
            print(f"# runs on this machine: {group.resources.tasks} {args.cluster} task(s)")
