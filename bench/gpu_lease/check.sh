#!/usr/bin/env bash
# The whole first look on a lent GPU machine, in one prepared call (bench/gpu_lease/README.md):
#   bench/gpu_lease/fetch-wheels.sh        # here, once: the cp312 wheels it lacks, into .whl/
#   run(command="bash bench/gpu_lease/check.sh", carry=[".whl"], timeout_s=590)
# Each step has its own time limit (545 s in all, most of it unused when nothing hangs), so one
# that hangs leaves time for the next; everything it
# prints and writes lands in $OUT (the log, preflight.json, the bench's JSON, partial or whole).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-lease-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD"
step() { echo "== $(date +%T) $*"; }
{
    step "machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    timeout 45 python3 -c "import sys, torch, torchvision, transformers, open_clip; print(sys.version.split()[0], torch.__version__, torchvision.__version__, transformers.__version__, open_clip.__version__, torch.cuda.get_device_name())"
    step "preflight: nvJPEG against Pillow, odd JPEGs, the stream race, decode rate"
    timeout 90 python3 -m bench.gpu_lease.preflight --out "$OUT"
    step "GPU tests"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu
    step "real models through a worker (ViT-H-14-378 first: the closest to its target)"
    timeout "${BENCH_SECONDS:-200}" python3 -m bench.throughput --device-only --out "$OUT" \
        --device-models ${DEVICE_MODELS:-gpu-vit-h14-378 gpu-dinov2-large gpu-vit-l14 gpu-vit-b32}
    step "done"
} 2>&1 | tee "$OUT/check.log"
