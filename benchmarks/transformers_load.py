"""Load a latticequant checkpoint with plain ``transformers`` and compare it with our loader.

``AutoModelForCausalLM.from_pretrained(DIR)`` reads GPTQ checkpoints through ``optimum`` and
``gptqmodel`` (run in the benchmark environment: ``bash scripts/bench_env.sh`` then
``.venv-bench/bin/pip install optimum``). Both models are evaluated on the protocol's held-out
text; their logits on the first windows and their perplexities are printed side by side.

    .venv-bench/bin/python benchmarks/transformers_load.py runs/bench_e2e/checkpoints/gptq-4g128-sym
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument(
        "--backend",
        default="gptq_torch",
        help="GPTQModel kernel for transformers to use (default gptq_torch: 'auto' picks a CPU "
        "kernel that needs in_features divisible by group_size, and 576 is not a multiple of 128)",
    )
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    from latticequant.checkpoint import load_quantized
    from latticequant.pipeline.data import load_text, perplexity, split_ids, tokenize

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    heldout = split_ids(tokenize(tokenizer, load_text(None)))[1]
    t0 = time.perf_counter()
    with open(Path(args.checkpoint) / "quantize_config.json") as fh:
        bits = json.load(fh)["bits"]
    theirs = AutoModelForCausalLM.from_pretrained(
        args.checkpoint,
        device_map="cpu",
        dtype=torch.float32,
        quantization_config=GPTQConfig(bits=bits, backend=args.backend),
    ).eval()
    load_theirs = time.perf_counter() - t0
    kinds = sorted({type(m).__name__ for m in theirs.modules() if hasattr(m, "qweight")})
    t0 = time.perf_counter()
    ours = load_quantized(args.checkpoint).eval()
    load_ours = time.perf_counter() - t0

    ids = heldout[: 2 * args.seqlen].view(2, args.seqlen)
    with torch.no_grad():
        a = theirs(input_ids=ids).logits.float()
        b = ours(input_ids=ids).logits.float()
    result = {
        "checkpoint": args.checkpoint,
        "backend": args.backend,
        "transformers_layer_classes": kinds,
        "max_abs_logit_diff": float((a - b).abs().max()),
        "max_abs_logit": float(b.abs().max()),
        "ppl_transformers": perplexity(theirs, heldout, args.seqlen),
        "ppl_latticequant": perplexity(ours, heldout, args.seqlen),
        "load_s_transformers": load_theirs,
        "load_s_latticequant": load_ours,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
