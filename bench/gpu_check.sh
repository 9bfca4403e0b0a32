#!/usr/bin/env bash
# The GPU check of issue 29: one command on a machine with one CUDA GPU (under 8 minutes on an H200), printing one
# table. It runs the CUDA tests (tests/test_gpu.py: codec parity device vs numpy, the copy stream and pinned slots
# writing the stored fixture's bytes, rows within bf16 of a CPU fp32 extraction, kill and resume), then
# bench/bench_gpu.py (extract vs a bare bf16 forward per codec for bert-base and a Llama-shape decoder; GPU SAE
# training against sparsify).
#
# Prepare once, here (reaches PyPI):  bash bench/gpu_wheels.sh        (wheels into .whl/, ignored by git)
# Then on the GPU machine (the device tool: carry [".whl"]):  bash bench/gpu_check.sh
# The table and the logs land in $OUT (or /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD/.whl/pkgs:$PWD"
else
    export PYTHONPATH="$PWD"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== CUDA tests"
timeout 180 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
echo "== table"
timeout 360 python3 bench/bench_gpu.py 2>"$OUT/bench.log" | tee "$OUT/table.md"
tail -5 "$OUT/bench.log"
