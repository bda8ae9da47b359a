"""submitit launchers: SLURM (or local) jobs per stage, requeue on time limits, pipeline chains, sweeps."""
from .job import StageJob
from .plan import STAGE_NAMES, JobGroup, plan_jobs, read_sweep
from .resources import Resources, make_executor, sbatch_script
from .submit import build_submit_parser, main

__all__ = ["STAGE_NAMES", "JobGroup", "Resources", "StageJob", "build_submit_parser", "main", "make_executor",
           "plan_jobs", "read_sweep", "sbatch_script"]
