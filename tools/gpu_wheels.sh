#!/usr/bin/env bash
# Download, here (network), the wheels tools/gpu_check.sh installs on the GPU machine, which has no network.
# Its image has torch, torchvision, numpy, PyYAML, tqdm, safetensors, scikit-learn, matplotlib, tensorboard and
# the dependencies named below (packaging, cloudpickle, typing-extensions), with Python 3.12
# (/work/.library/device/KINDS.md); it lacks omegaconf, submitit and faiss-cpu. The versions are this
# virtualenv's, so the machine runs what the tests here ran. Left behind, on purpose:
#  - pyautoattack: its wheel is 42 MiB (it ships a 44 MB example model) and no section runs AutoAttack;
#  - ffcv: it compiles against libturbojpeg and OpenCV, which the image lacks (its rows are recorded as not run);
#  - faiss-gpu: hundreds of MiB; the GPU k-means row uses our torch matmul path.
# The folder travels to the machine in `carry`, with the working tree, under 64 MiB in all.
#   tools/gpu_wheels.sh [DIR]    (default .gpu-wheels, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu-wheels}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE_PYTHON=3.12
MAX_MIB=40  # leaves the working tree room in the 64 MiB that travels
specs=$("$PY" -c "import importlib.metadata as m
print(' '.join(f'{p}=={m.version(p)}' for p in ('omegaconf', 'submitit', 'faiss-cpu')))")
rm -rf "$DIR" && mkdir -p "$DIR"  # one version of each: two would stop the install there
# shellcheck disable=SC2086  # $specs is a list of requirements
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" $specs 2>&1 | { grep -v "is ignored" || true; }
ls -l "$DIR"
mib=$(du -sm "$DIR" | cut -f1)
echo "$specs: ${mib} MiB in $DIR for CPython $DEVICE_PYTHON x86-64"
[ "$(ls "$DIR"/*.whl | wc -l)" -eq 3 ] || { echo "expected 3 wheels in $DIR" >&2; exit 1; }
[ "$mib" -le "$MAX_MIB" ] || { echo "$DIR is $mib MiB, over $MAX_MIB MiB" >&2; exit 1; }
