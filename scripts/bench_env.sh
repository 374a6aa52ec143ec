#!/usr/bin/env bash
# Create (idempotently) the benchmark environment `.venv-bench` in the repository root.
#
# The benchmarks compare latticequant with GPTQModel, which is a heavy dependency that the
# package and its tests never need, so it lives in a venv of its own. The venv reuses the
# system's torch (--system-site-packages) so that nothing multi-gigabyte is downloaded.
#
# GPTQModel 7.7.0 (the version behind the reference figures in docs/protocol.md) declares
# `torch>=2.14.1`, but runs on the CPU with torch 2.13.0. pip cannot override a dependency's
# requirement, so GPTQModel is installed with --no-deps and its other requirements are installed
# from its own metadata in one pip command that also pins torch==2.13.0 (pip then never touches
# torch). `pip check` therefore reports exactly one unmet requirement: gptqmodel's torch floor.
#
# Usage: bash scripts/bench_env.sh            (then: source .venv-bench/bin/activate)
# Env:   GPTQMODEL_VERSION (default 7.7.0), PYTHON (default python3), TORCH_VERSION (2.13.0)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-bench"
PYTHON="${PYTHON:-python3}"
GPTQMODEL_VERSION="${GPTQMODEL_VERSION:-7.7.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

TAG=bench_env.sh
# shellcheck source=scripts/bench_venv.sh
source "$ROOT/scripts/bench_venv.sh"  # PY, PIP, CONSTRAINTS

installed="$("$PY" -c "import importlib.metadata as m; print(m.version('gptqmodel'))" 2>/dev/null || true)"
if [ "$installed" != "$GPTQMODEL_VERSION" ]; then
    echo "bench_env.sh: installing gptqmodel==$GPTQMODEL_VERSION (no deps)"
    "${PIP[@]}" install --no-deps "gptqmodel==$GPTQMODEL_VERSION"
fi

# gptqmodel's own requirements, markers evaluated, torch left out (it is pinned instead).
mapfile -t REQS < <("$PY" - <<'EOF'
import importlib.metadata as m
from packaging.requirements import Requirement

for line in m.requires("gptqmodel") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() == "torch":
        continue
    print(str(req).split(";")[0].strip())
EOF
)
echo "bench_env.sh: installing ${#REQS[@]} requirements of gptqmodel with torch==$TORCH_VERSION pinned"
"${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION" "${REQS[@]}"

echo "bench_env.sh: installing optimum (transformers reads GPTQ checkpoints through it)"
"${PIP[@]}" install -c "$CONSTRAINTS" optimum

echo "bench_env.sh: installing latticequant (editable)"
"${PIP[@]}" install -c "$CONSTRAINTS" --no-deps -e "$ROOT"

"${PIP[@]}" check || true  # expected: gptqmodel's torch>=2.14.1 floor, nothing else
GPTQMODEL_CPU_WORKERS=2 "$PY" - <<'EOF'
import importlib.metadata as m

import torch

import gptqmodel  # noqa: F401

print(f"bench_env.sh: ok: torch {torch.__version__}, gptqmodel {m.version('gptqmodel')}")
EOF
echo "bench_env.sh: activate with: source $VENV/bin/activate  (and export GPTQMODEL_CPU_WORKERS=2)"
