#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine: CPU torch first (a bare `torch` would pull a
# multi-gigabyte CUDA build), then the package with its test extras, then lint and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# The core's tests work on small tensors, where one thread is fastest and timings stay stable.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m ruff check latticequant tests benchmarks
python -m pytest -q
