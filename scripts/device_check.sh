#!/usr/bin/env bash
# GPU check of pyro_vae in one run (under 8 minutes on one GPU). Everything it measures is
# written under $OUT (default: ./device-check) in two files: summary.txt (versions, each
# step's exit status and wall time) and steps.log (each step's output, under a header).
#
#   OUT=/tmp/check DATA=../shared/data/binarized_mnist.npz bash scripts/device_check.sh
#
# Steps: the CUDA-marked tests; the speed table on cuda (batch 100 and 1000: plain twin,
# pyro_vae eager and --jit); a 5-epoch binarized-MNIST training on cuda, eager and --jit;
# the IS log p(x) throughput (K = 5000, 1000 images) on cuda; torchrun over two GPUs when
# two exist. Without a CUDA GPU it stops at once with exit status 3 and one line on stderr.
# Without the binarized-MNIST file it trains on random 28x28 binary images (named so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-check}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if ! problem=$("$PY" -c "import torch, pyro" 2>&1); then
    echo "device_check: torch and pyro must import ($(echo "$problem" | tail -n 1))" >&2
    exit 3
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device_check: no CUDA GPU is visible to torch; nothing was measured" >&2
    exit 3
fi

summary="$OUT/summary.txt"
log="$OUT/steps.log"
: >"$summary"
: >"$log"
step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, record its status and wall time
    local name=$1 limit=$2 start status ms
    shift 2
    echo "===== $name: $*" >>"$log"
    start=$(date +%s%N)
    timeout "$limit" "$@" >>"$log" 2>&1
    status=$?
    ms=$((($(date +%s%N) - start) / 1000000))
    printf '%-14s status %3d  %4d.%03d s\n' "$name" "$status" $((ms / 1000)) $((ms % 1000)) |
        tee -a "$summary"
}

"$PY" -c "
import platform, pyro, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pyro', pyro.__version__,
      'python', platform.python_version())
for i in range(torch.cuda.device_count()):
    print('gpu', i, torch.cuda.get_device_name(i))
" | tee -a "$summary"

DATA=${DATA:-../shared/data/binarized_mnist.npz}
if [ ! -f "$DATA" ]; then
    DATA="$OUT/random_28x28.npz"
    echo "data: $DATA (random binary images: speed only, no quality)" | tee -a "$summary"
    "$PY" -c "
import numpy as np
rng = np.random.default_rng(0)
np.savez('$DATA', **{k: (rng.random((n, 784)) < 0.13).astype(np.uint8)
                     for k, n in (('train', 50000), ('valid', 10000))})"
else
    echo "data: $DATA" | tee -a "$summary"
fi

step cuda_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_train_speed.py -k cuda
for batch in 100 1000; do
    step "speed_b$batch" 150 "$PY" scripts/benchmark_speed.py --data binarized-mnist "$DATA" \
        --devices cuda --batch-size "$batch" --latent-dim 50 --hidden-dims 400 \
        --guides diagonal full --variants plain textbook default jit eager --repeats 3
done
common=(--data binarized-mnist "$DATA" --latent-dim 50 --hidden-dims 400 --epochs 5
    --device cuda --quiet --overwrite)
step train_eager 150 "$PY" -m pyro_vae train "${common[@]}" --no-jit --out "$OUT/run-eager"
step train_default 150 "$PY" -m pyro_vae train "${common[@]}" --out "$OUT/run-default"
for run in run-eager run-default; do
    { echo "===== $run/metrics.csv"; cat "$OUT/$run/metrics.csv"; } >>"$log" 2>&1
done
step is_k5000 150 "$PY" -m pyro_vae evaluate "$OUT/run-eager" --split valid \
    --num-points 1000 --num-samples 5000 --device cuda --json --quiet
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    step torchrun_2gpu 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m pyro_vae train "${common[@]}" --epochs 2 --out "$OUT/run-ddp"
fi
rm -rf "$OUT"/run-* "$OUT/random_28x28.npz"  # two text files come back
echo "device_check: done; see $summary"
