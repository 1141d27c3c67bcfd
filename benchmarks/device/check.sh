#!/usr/bin/env bash
# The GPU checks of issue 13 as one command on a lent GPU machine, which has PyTorch but reaches no package registry
# and does not see ../shared (benchmarks/device/prepare.sh makes what it needs here first; docs/benchmarks.md, "On a
# GPU"): the CUDA tests (nvJPEG decode and device reads against the CPU, bf16 on CUDA against fp32 on the CPU), then
# the engine benchmark with tiles decoded on the CPU and on the GPU, then the shipped models end to end. Every step
# has its own time limit, so that a slow or failing step leaves the others' results: $OUT/check.log (everything
# printed) and one JSON per benchmark (the device tool returns at most 8 files).
# DEVICE=cpu PYTHON=... WHEELS=... rehearse it on a machine without a GPU (the CUDA tests then skip; BENCH_ARGS, e.g.
# "--max-tiles 64 --repeats 1", shortens the engine benchmark).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/device-out}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/wsi-site}
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1
tee_pid=$!
start=$(date +%s)
step() { echo "== $(($(date +%s) - start)) s: $*"; }

step "installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl ||
  { echo "the wheels did not install: run benchmarks/device/prepare.sh here and carry .whl"; exit 3; }
export PYTHONPATH="$PWD:$SITE" WSI_SHARED_DATA="$PWD/.device-data" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$PYTHON" - <<'PY'
import importlib.metadata as m
import torch
import wsi_pipeline.engine.device_reads  # what the checks run imports with the carried dependencies
import wsi_pipeline.run.stages
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("torchvision", "numpy", "scikit-image", "tifffile", "imagecodecs", "zarr", "openslide-python"):
    print(name, m.version(name))
PY
} || { echo "wsi_pipeline does not import there: a dependency is missing from .whl (benchmarks/device/prepare.sh)"; exit 3; }

step "CUDA tests"
timeout 240 "$PYTHON" -m pytest -p no:cacheprovider -o addopts= -rA -k "cuda or nvjpeg" \
  tests/test_gpu_decode.py tests/test_device_reads.py tests/test_engine.py
tests_rc=$?

for decode in device cpu; do
  name=$([ "$decode" = device ] && echo engine-cuda || echo engine-cuda-cpu-decode)
  [ "$DEVICE" = cuda ] || name="$name-on-$DEVICE"
  step "engine benchmark, tiles decoded on the $decode ($name.json)"
  timeout 180 "$PYTHON" benchmarks/engine.py --device "$DEVICE" --decode "$decode" --skip-memory ${BENCH_ARGS:-} \
    --out "$OUT/$name.json"
done

step "the shipped models end to end (shipped-$DEVICE.json)"
timeout 200 "$PYTHON" benchmarks/shipped.py --device "$DEVICE" --workers "$([ "$DEVICE" = cuda ] && echo 8 || echo 1)" --repeats 1 --out "$OUT/shipped-$DEVICE.json"

step "done; CUDA tests exit status $tests_rc"
exec >&- 2>&-
wait "$tee_pid"  # check.log complete before the device tool collects $OUT
exit "$tests_rc"
