#!/usr/bin/env bash
# The speed benchmark's GPU run, as one prepared command for a machine with an H100 or H200 (docs/performance.md, "GPU").
#
# That machine has python3 3.12 with torch, transformers, peft, accelerate, timm and safetensors, but no
# hub access and not the packages below. Here, once, fetch them as wheels into the ignored folder .whl/:
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 \
#     wcwidth==0.9.4 importlib_metadata==10.2.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
#     referencing==0.37.0 rpds-py==2026.9.1 bitsandbytes==0.50.2
# then run `bash tools/bench_gpu.sh` there with .whl carried (about 51 MB), timeout 560 s.
#
# Writes $OUT/<run>/bench.json and bench.md for each run below, <run>.log, and gpu.txt (nvidia-smi).
# SIZE=tiny DEVICE=cpu PYTHON=.venv/bin/python OUT=/tmp/b bash tools/bench_gpu.sh checks the script here.
set -uo pipefail
OUT=${OUT:-results/bench-gpu}
SIZE=${SIZE:-full}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "bench_gpu: installing .whl/*.whl failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
# The package from the checkout (its pyproject pins Python 3.11 for the workflow; the benchmark needs none of that).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } \
    > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"

failed=0
bench() {  # bench NAME SECONDS [bench options]: one run under a time limit, its table printed
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$PY" -m conceptbench.bench --size "$SIZE" --device "$DEVICE" --out "$OUT/$name" "$@" \
        > "$OUT/$name.log" 2>&1 || { failed=1; echo "bench_gpu: $name failed or ran out of time; see $name.log"; }
    cat "$OUT/$name/bench.md" 2>/dev/null || tail -5 "$OUT/$name.log"
}

# Every method family's training step (bf16 autocast, fused AdamW) and both samplers at batch 1,
# plain (fp32, classic attention) and fast (bf16, SDPA with fused QKV, channels_last, TF32).
bench main 240
# The fast samplers with the U-Net compiled with CUDA graphs (at batch 2 a 512² U-Net step is launch-bound);
# the compile time is reported apart from the median.
bench compile 150 --methods "" --profiles fast --compile --compile-mode reduce-overhead
# DreamBooth's memory: gradient checkpointing and 8-bit AdamW (the target: >= 8 steps/s within 24 GB).
bench dreambooth-lowmem 60 --methods dreambooth --samplers "" --gradient-checkpointing --optimizer adamw8bit
# Batched sampling: the per-image cost at 8 images a call.
bench batch8 60 --methods "" --profiles fast --sample-batch 8
exit $failed
