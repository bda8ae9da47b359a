"""Metric logging: device-side accumulation, one host sync per log interval.

Each interval's averages go to `metrics.jsonl`, TensorBoard and the console (a tqdm bar
when interactive, plain lines otherwise). The flush is also where a non-finite loss is
caught, so training stops before a bad state can reach a checkpoint.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config_schema import ConfigError
from ..run_folder import write_text


class NonFiniteLossError(RuntimeError):
    pass


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (by a run that died before its next checkpoint), and a last line
    cut short by a crash mid-write (with a warning); a damaged line elsewhere is an error naming it."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line]
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"[train] warning: dropped the half-written last line of {path}", file=sys.stderr, flush=True)
                break
            raise ConfigError(f"{path} line {number} is not JSON; it was edited or damaged: repair or delete that "
                              "line to resume") from None
        if record.get("step", 0) <= last_step:
            keep.append(line)
    write_text("".join(line + "\n" for line in keep), path)


class MetricLogger:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, images_per_step: int,
                 enabled: bool = True, interactive: bool | None = None):
        self.enabled = enabled
        self.images_per_step = images_per_step
        self.total_steps = total_steps
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.t0 = time.perf_counter()
        self.tb = self.bar = None
        if not enabled:
            return
        self.jsonl_path = Path(out_dir) / "metrics.jsonl"
        truncate_jsonl(self.jsonl_path, start_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
        if interactive if interactive is not None else sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int, epoch: int, lr: float) -> dict[str, float]:
        """Average the interval's metrics over steps and ranks; log them; raise if one is not finite."""
        if self.count == 0:
            return {}
        names = sorted(self.sums)
        values = torch.stack([self.sums[n] for n in names]) / self.count
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)  # SUM: gloo has no AVG
            values = values / dist.get_world_size()
        averaged = dict(zip(names, values.tolist()))
        elapsed = time.perf_counter() - self.t0
        record = {"step": step, "epoch": epoch, "lr": lr, **averaged,
                  "images_per_s": self.count * self.images_per_step / max(elapsed, 1e-9), "time": time.time()}
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()
        bad = [n for n in names if not math.isfinite(averaged[n])]
        if self.enabled:
            self._write(record)
        if bad:
            raise NonFiniteLossError(f"{', '.join(bad)} became non-finite by step {step} ({averaged})")
        return record

    def _write(self, record: dict) -> None:
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for name, value in record.items():
            if name not in ("step", "epoch", "time") and math.isfinite(value):
                self.tb.add_scalar(f"train/{name}", value, step)
        line = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("time",))
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={record.get('loss', float('nan')):.4f} lr={record['lr']:.3g}")
        else:
            print(f"[train] {line}", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
