#!/usr/bin/env bash
# The one prepared check of a GPU machine (one H100/H200, no network): every benchmark that needs a GPU, as
# sections run one after another. A section that fails or times out is recorded and the others still run; the
# exit status is non-zero at the end if any did. Results: $OUT/gpu_check.md (the tables), $OUT/gpu_check.json
# (each bench's JSON report) and $OUT/gpu_check.log (all output). Sized to end within --budget seconds (default
# 520: under 9 minutes with the report); the last sections get what is left. docs/benchmarks.md says how to run it.
#   tools/gpu_check.sh [--device cuda|cpu] [--tiny] [--out DIR] [--wheels DIR] [--budget SECONDS]
# --device cpu --tiny runs the same sections at toy sizes on a CPU in a minute or two (tests/test_gpu_check.py).
# Wheels in --wheels (default .gpu-wheels, made by tools/gpu_wheels.sh) are installed first, into a temporary
# folder on PYTHONPATH: the packages the machine lacks. The repository itself is used from PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda TINY=0 OUTDIR=${OUT:-runs/gpu-check} WHEELS=.gpu-wheels BUDGET=520
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --out) OUTDIR=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    *) sed -n 7p "$0" >&2; exit 2 ;;
  esac
done
[[ $DEVICE == cuda || $DEVICE == cpu ]] || { echo "--device must be cuda or cpu" >&2; exit 2; }
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
CACHE=$WORK/cache LOG=$OUTDIR/gpu_check.log TSV=$WORK/sections.tsv
export PY DEVICE TINY WORK CACHE PYTHONUNBUFFERED=1 PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$LOG"; : > "$TSV"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

record() {  # record NAME STATUS SECONDS LIMIT COMMAND REASON: one row of the report
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$TSV"
}

notrun() {  # notrun NAME REASON: a row that could not run here, with why (not a failure)
  echo "== $1: not run: $2" | tee -a "$LOG"
  record "$1" "not run" 0 0 "" "$2"
}

section() {  # section NAME LIMIT COMMAND: COMMAND (bash) for at most LIMIT s, less if the budget runs short
  local name=$1 limit=$2 cmd=$3 left t0=$SECONDS rc
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, the budget of $BUDGET s is spent" | tee -a "$LOG"
    record "$name" "out of time" 0 0 "$cmd" "the --budget of $BUDGET s was spent before it started"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most $limit s): $cmd" | tee -a "$LOG"
  timeout -k 15 "$limit" bash -c "$cmd" 2>&1 | tee "$WORK/$name.out" >> "$LOG"
  rc=${PIPESTATUS[0]}
  record "$name" "$rc" $((SECONDS - t0)) "$limit" "$cmd" ""
  echo "== $name: exit $rc" | tee -a "$LOG"
}

install_wheels() {  # the packages the machine lacks, without their dependencies (the image has those)
  mkdir -p "$WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl \
    || return 1
  "$PY" -c 'import json, sys; from pathlib import Path
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
print("\n".join(w.name for w in wheels))
print(json.dumps({"bench": "wheels", "wheels": [w.name for w in wheels], "mib": sum(w.stat().st_size for w in wheels) / 2**20}))' "$WHEELS"
}

env_check() {  # what the sections import, the versions, and the GPU; fails on a missing package
  "$PY" - <<'EOF'
import importlib, importlib.metadata as m, json, os, platform, sys
need = ["torch", "torchvision", "numpy", "omegaconf", "yaml", "tqdm", "faiss", "submitit", "safetensors", "sklearn",
        "matplotlib", "tensorboard", "advcl_dist"]
versions, missing, where = {}, {}, {}
for name in need + ["ffcv"]:
    try:
        module = importlib.import_module(name)
        versions[name] = getattr(module, "__version__", None) or m.version(name)
        where[name] = os.path.dirname(module.__file__)  # the carried wheels load from the temporary site folder
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        (missing if name in need else versions)[name] = f"{type(e).__name__}: {e}"[:200]
import torch
cuda = torch.cuda.is_available()
report = {"bench": "env", "python": platform.python_version(), "executable": sys.executable, "versions": versions,
          "missing": missing, "where": where, "cuda": cuda, "cores": len(os.sched_getaffinity(0)),
          "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
          "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}
print("\n".join(f"{k}: {v}" for k, v in versions.items()))
print(json.dumps(report))
sys.exit(1 if missing or (os.environ["DEVICE"] == "cuda" and not cuda) else 0)
EOF
}

pretrain_run() {  # tools/pretrain.py under torchrun (NCCL on CUDA), bf16 + channels_last; images/s from metrics.jsonl
  local size
  if [ "$TINY" = 1 ]; then
    size="model.width=4 train.batch_size=256 train.epochs=1 optim.warmup_epochs=0 attack.steps=1 train.log_every=1"
  else size="train.batch_size=128 train.epochs=18 train.log_every=10"; fi  # 1437 digits: 11 steps an epoch, 198 steps
  "$PY" -c "import numpy as np; from advcl_dist.data import get_dataset
n = len(get_dataset('digits', 'train')); r = np.random.default_rng(0)
np.save('$WORK/pseudo.npy', np.stack([r.integers(0, k, n) for k in (2, 10, 50, 100)], 1))" || return 1
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 tools/pretrain.py --config configs/demo.yaml \
    out_dir="$WORK/pretrain" train.device="$DEVICE" train.amp=bf16 train.channels_last=true train.ckpt_every=100000 \
    pseudo.labels="$WORK/pseudo.npy" $size || return 1
  "$PY" - <<'EOF'
import json, os, statistics
records = [json.loads(line) for line in open(os.environ["WORK"] + "/pretrain/metrics.jsonl")]
rates = [r["images_per_s"] for r in records]
steady = rates[1:] or rates  # the first interval holds the warm-up (allocator, cuDNN, NCCL)
report = {"bench": "pretrain", "device": os.environ["DEVICE"], "steps": records[-1]["step"], "intervals": len(rates),
          "images_per_s": statistics.median(steady), "images_per_s_intervals": rates,
          "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"]}
print("| steps | images/s (median of intervals after the first) | loss first → last |\n|---:|---:|---|")
print(f"| {report['steps']} | {report['images_per_s']:.1f} | {report['loss_first']:.3f} → {report['loss_last']:.3f} |")
print(json.dumps(report))
EOF
}
loader() {  # loader NAME FLAGS: both formats where FFCV imports, else torchvision and a row saying why not FFCV
  if [ "$FFCV" = 1 ]; then section "$1" 150 "$B loader $2 --device $DEVICE --cache $CACHE"; return; fi
  section "$1" 150 "$B loader --format torchvision $2 --device $DEVICE --cache $CACHE"
  notrun "$1-ffcv" "ffcv does not import here (it needs libturbojpeg and OpenCV built for it; the image has neither)"
}
export WHEELS; export -f install_wheels env_check pretrain_run

# --- the sections, most wanted first (the budget cuts the last ones short) ---------------------------------
B="$PY tools/bench.py"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then section wheels 120 "install_wheels"
else notrun wheels "no wheels in $WHEELS (tools/gpu_wheels.sh makes them): the installed packages are used"; fi
section env 60 "env_check"
FFCV=$("$PY" -c "import ffcv.loader" >/dev/null 2>&1 && echo 1 || echo 0)
if [ "$TINY" = 1 ]; then
  section step-r18 240 "$B step --arch resnet18 --width 4 --size 32 --batch 8 --steps 1 --warmup 1 --attack-steps 1 --device $DEVICE"
  section precision 120 "$B precision --width 4 --batch 16 --train-steps 2 --images 32 --device $DEVICE --cache $CACHE"
  section pretrain 180 "pretrain_run"
  section kmeans 120 "$B kmeans --rows 3000 --dim 8 --centres 6 --ks 2 6 --iters 5 --procs 1 --no-sklearn --device $DEVICE --cache $CACHE"
  section views-32 60 "$B views --batch 4 8 --size 32 --steps 2 --warmup 1 --device $DEVICE"
  L32="--images 64 --size 32 --batch-size 16 --warmup 2 --workers 1" L256="--images 32 --size 128 --batch-size 8 --warmup 1 --workers 1"
  R50="--size 32 --batch 2 --steps 1 --warmup 1 --attack-steps 1 --modes bf16"
  VIEWS224="--batch 4 --size 64 --steps 2 --warmup 1"
  COMPILE="TORCH_COMPILE_DISABLE=1 $B step --arch resnet18 --width 4 --size 32 --batch 8 --steps 1 --warmup 1 --attack-steps 1"
else
  section step-r18 180 "$B step --arch resnet18 --size 32 --batch 512 --device $DEVICE"
  section precision 150 "$B precision --device $DEVICE --cache $CACHE"
  section pretrain 150 "pretrain_run"
  section kmeans 150 "$B kmeans --rows 1000000 --dim 128 --procs 1 --no-sklearn --device $DEVICE --cache $CACHE"
  section views-32 60 "$B views --batch 32 512 --size 32 --device $DEVICE"
  L32="--images 20000 --size 32 --workers 8" L256="--images 2048 --size 256 --batch-size 64 --workers 8"
  R50="--size 224 --batch auto --steps 5 --warmup 2"
  VIEWS224="--batch 32 256 --size 224"
  COMPILE="$B step --arch resnet18 --size 32 --batch 512"
fi
loader loader-32 "$L32"
section step-r50 240 "$B step --arch resnet50 $R50 --device $DEVICE"
loader loader-256 "$L256"
section views-224 60 "$B views $VIEWS224 --device $DEVICE"
section step-r18-compile 300 "$COMPILE --modes bf16 --compile --device $DEVICE"

# --- the report ------------------------------------------------------------------------------------------------
"$PY" - "$TSV" "$WORK" "$OUTDIR" "$DEVICE" "$TINY" "$BUDGET" "$START" <<'EOF'
import json, sys, time
from pathlib import Path

tsv, work, out, device, tiny, budget, start = sys.argv[1:]
sections, failed = {}, []
for row in Path(tsv).read_text().splitlines():
    name, status, seconds, limit, command, reason = row.split("\t")
    text = (Path(work) / f"{name}.out").read_text(errors="replace") if status not in ("not run", "out of time") else ""
    lines = text.splitlines()
    report = None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                report = json.loads(line)
                break
            except ValueError:
                pass
    if status.isdigit():
        rc = int(status)
        status = "ok" if rc == 0 and report else "timed out" if rc in (124, 137) else \
            f"failed (exit {rc})" if rc else "failed (no JSON line)"
    if status not in ("ok", "not run"):
        failed.append(name)
    body = [x for x in lines if not x.startswith("{")]
    first = next((i for i, x in enumerate(body) if x.startswith("|")), None)
    if first is not None and status == "ok":
        summary = body[first:]  # the bench's own table and the notes after it
    else:  # the command and its error (first lines), and how it ended
        summary = body if len(body) <= 30 else [*body[:8], "[...]", *body[-20:]]
    sections[name] = {"status": status, "seconds": round(float(seconds), 1), "limit_s": int(limit),
                      "command": command, "reason": reason or None, "report": report, "summary": summary}


def headline(name, r):
    """The few numbers of a section worth a glance; its own table follows in the report."""
    if not r:
        return ""
    try:
        if r["bench"] == "step":
            modes = ", ".join(f"{m} {x['images_per_s']:.0f}" if "images_per_s" in x else f"{m} failed"
                              for m, x in r["modes"].items())
            peak = r["derived"]["matmul_peak_tflops"]
            return f"batch {r['args']['batch']}, images/s: {modes}" + (f"; bf16 matmul peak {peak:.0f} TFLOP/s"
                                                                         if peak else "")
        if r["bench"] == "precision":
            a, p = r["attacks"], r["pgd20"]
            ratio = " / ".join("–" if a[k]["gain_ratio"] is None else f"{a[k]['gain_ratio']:.3f}×" for k in a)
            return f"bf16/fp32 gain δ / δ_ce {ratio}; RA fp32 {p['fp32']['RA']}% vs bf16 {p['bf16']['RA']}%"
        if r["bench"] == "kmeans":
            return ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in r["runs"].items())
        if r["bench"] == "loader":
            runs = r.get("runs", [r])
            return ", ".join(f"{x['format']} {x['images_per_s']:.0f} images/s" for x in runs)
        if r["bench"] == "views":
            return "images/s: " + ", ".join(f"batch {b} {x['images_per_s']:.0f}" for b, x in r["runs"].items())
        if r["bench"] == "pretrain":
            return f"{r['steps']} steps, {r['images_per_s']:.0f} images/s"
        if r["bench"] == "wheels":
            return f"{len(r['wheels'])} wheels, {r['mib']:.1f} MiB: " + ", ".join(w.split("-")[0] for w in r["wheels"])
        if r["bench"] == "env":
            return f"Python {r['python']}, torch {r['versions'].get('torch')}, {r['device_name']}"
        found = []  # any other bench: its images/s, wherever they are

        def walk(x, path):
            if isinstance(x, dict):
                for k, v in x.items():
                    if k == "images_per_s" and isinstance(v, (int, float)):
                        found.append(f"{path or 'images/s'} {v:.0f}")
                    else:
                        walk(v, f"{path}.{k}".strip("."))
        walk(r, "")
        return "images/s: " + ", ".join(found[:6]) if found else ""
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"(no headline: {type(e).__name__})"


elapsed = time.time() - int(start)
md = [f"# GPU check ({'tiny, ' if tiny == '1' else ''}{device})", "",
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {elapsed:.0f} s of a {budget} s budget; "
      f"{len(failed)} section(s) failed: {', '.join(failed) or 'none'}.", "",
      "| section | status | s | headline |", "|---|---|---:|---|"]
for name, s in sections.items():
    md.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | {s['reason'] or headline(name, s['report'])} |")
for name, s in sections.items():
    if s["status"] != "not run":
        md += ["", f"## {name}: {s['status']}", "", f"`{s['command']}`", ""]
        md += s["summary"] if s["status"] == "ok" else ["```", *s["summary"], "```"]
Path(out, "gpu_check.md").write_text("\n".join(md) + "\n")
for s in sections.values():
    del s["summary"]
Path(out, "gpu_check.json").write_text(json.dumps({"device": device, "tiny": tiny == "1", "budget_s": int(budget),
                                                   "seconds": round(elapsed, 1), "failed": failed,
                                                   "sections": sections}, indent=1) + "\n")
print("\n".join(md[:len(sections) + 6]))
sys.exit(1 if failed else 0)
EOF
