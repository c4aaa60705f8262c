#!/usr/bin/env bash
# Download, here (where pip reaches a registry), the cp312 wheels a lent GPU machine lacks
# (bench/gpu_lease/wheels.txt) into .whl/ (git-ignored); a `run` names `.whl` in `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl  # one version of each: a wheel left from an earlier fetch would stop the install
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
grep -v '^#' bench/gpu_lease/wheels.txt | grep -v '^$' \
    | xargs python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl
du -sh .whl
