#!/usr/bin/env bash
# Installs this package on a machine with no network: bench/gpu.sh's first step, and what
# tests/test_offline_install.py runs in a fresh virtual environment that can reach no index, so the two cannot drift.
#   1. the wheels carried in .whl/ (bench/carry_wheels.py fills it), every one of them;
#   2. this package in editable mode: no dependencies (the machine's torch and the rest stay as they are), no build
#      isolation (pip cannot fetch a build environment, so setuptools + wheel come from step 1).
# Every pip call has --no-index. A failed first step does not stop the second; either one failing fails the script.
set -uo pipefail
cd "$(dirname "$0")/.."
rc=0
if ls .whl/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --find-links .whl .whl/*.whl || rc=$?
fi
pip install -q --no-deps --no-build-isolation --no-index -e . || rc=$?
exit "$rc"
