# Sourced by the scripts that make a benchmark environment (bench_env.sh, llmcompressor_env.sh):
# a venv that reuses the system's torch (--system-site-packages, so nothing multi-gigabyte is
# downloaded), with torch pinned in a constraints file so that pip never replaces it.
#
# Reads: ROOT, VENV, PYTHON, TORCH_VERSION and TAG (the calling script's name, for messages).
# Sets:  PY (the venv's python), PIP (an array: its pip), CONSTRAINTS (the constraints file).

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)"; then
    echo "$TAG: $PYTHON needs torch==$TORCH_VERSION installed first (the venv reuses it):" >&2
    echo "  $PYTHON -m pip install torch==$TORCH_VERSION" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "$TAG: creating $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
