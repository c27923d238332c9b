#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on a lent GPU machine that its image lacks (tyro and its
# dependencies, gguf), downloaded here into .whl/ (ignored by git) for the device tool to carry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  tyro docstring-parser typeguard shtab gguf
