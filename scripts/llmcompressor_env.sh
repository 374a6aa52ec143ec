#!/usr/bin/env bash
# Create (idempotently) the environment `.venv-llmc` in the repository root, with llm-compressor,
# for benchmarks/llmcompressor_load.py (checkpoints made by llm-compressor itself, read by ours).
#
# It cannot share `.venv-bench` (scripts/bench_env.sh): llm-compressor 0.14.0.1, the newest
# release, pins `compressed-tensors==0.19.0` and `transformers>=5.15.0,<=5.17.0`, while GPTQModel
# 7.7.0 needs `transformers>=5.20.2` and our `test` extra compressed-tensors 0.20.x. No release of
# llm-compressor takes compressed-tensors 0.20, so this venv holds 0.19.0 and transformers 5.17.0
# (shadowing the system's), and the checkpoints it writes are read back by the system's
# transformers and compressed-tensors 0.20 as well as by this venv's. The venv reuses the system's
# torch (--system-site-packages, torch==2.13.0 pinned as in bench_env.sh; llm-compressor accepts
# torch>=2.10,<=2.14.0). llm-compressor is never a dependency of the package or of its tests.
#
# Usage: bash scripts/llmcompressor_env.sh     (then: .venv-llmc/bin/python ...)
# Env:   LLMCOMPRESSOR_VERSION (default 0.14.0.1), PYTHON (default python3), TORCH_VERSION (2.13.0)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-llmc"
PYTHON="${PYTHON:-python3}"
LLMCOMPRESSOR_VERSION="${LLMCOMPRESSOR_VERSION:-0.14.0.1}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

TAG=llmcompressor_env.sh
# shellcheck source=scripts/bench_venv.sh
source "$ROOT/scripts/bench_venv.sh"  # PY, PIP, CONSTRAINTS

installed="$("$PY" -c "import importlib.metadata as m; print(m.version('llmcompressor'))" 2>/dev/null || true)"
if [ "$installed" != "$LLMCOMPRESSOR_VERSION" ]; then
    echo "llmcompressor_env.sh: installing llmcompressor==$LLMCOMPRESSOR_VERSION with torch==$TORCH_VERSION pinned"
    "${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION" "llmcompressor==$LLMCOMPRESSOR_VERSION"
fi

echo "llmcompressor_env.sh: installing latticequant (editable, no deps)"
"${PIP[@]}" install -c "$CONSTRAINTS" --no-deps -e "$ROOT"

"${PIP[@]}" check || true
"$PY" - <<'EOF'
import importlib.metadata as m

import torch

import llmcompressor  # noqa: F401

print(
    f"llmcompressor_env.sh: ok: torch {torch.__version__}, llmcompressor {m.version('llmcompressor')}, "
    f"compressed-tensors {m.version('compressed-tensors')}, transformers {m.version('transformers')}"
)
EOF
