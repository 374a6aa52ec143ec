"""Generation against transformers' own ``generate``, and the dense and packed paths alike."""

from __future__ import annotations

import pytest
import torch
from runs import run_quantize
from tiny import make_char_tokenizer, make_tiny_llama

import latticequant as lq
from latticequant.checkpoint import load_quantized
from latticequant.formats import QuantLinear
from latticequant.methods.hptq import HPTQConfig
from latticequant.pipeline.data import protocol_text
from latticequant.pipeline.generate import GenerationConfig, generate, weight_memory

PROMPT = "def main():\n    "


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = make_char_tokenizer()
    model = make_tiny_llama()
    ids = torch.tensor(tok(protocol_text()[:4000])["input_ids"])
    calib = ids[: 4 * 64].view(4, 64)
    out = tmp_path_factory.mktemp("gen") / "q"
    cfg = lq.QuantConfig(bits=4, group_size=32, order="act")
    run_quantize(model, tok, calib, "gptq", cfg, out, progress=False)
    return out, tok


def test_greedy_equals_transformers_generate():
    model, tok = make_tiny_llama(), make_char_tokenizer()
    ours = generate(model, tok, PROMPT, GenerationConfig(max_new_tokens=20, chat=False))
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    ref = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id)
    assert ours.token_ids == ref[0, ids.shape[1] :].tolist()
    assert ours.prompt_tokens == ids.shape[1] and ours.new_tokens == len(ours.token_ids)


def test_dense_cache_and_packed_weights_generate_the_same_tokens(checkpoint):
    out, tok = checkpoint
    cfg = GenerationConfig(max_new_tokens=24, chat=False)
    dense = load_quantized(out)
    packed = load_quantized(out)
    for m in packed.modules():
        if isinstance(m, QuantLinear):
            m.cache_weight = False
    a, b = generate(dense, tok, PROMPT, cfg), generate(packed, tok, PROMPT, cfg)
    assert a.token_ids == b.token_ids
    assert weight_memory(dense)["cache"] > 0 and weight_memory(packed)["cache"] == 0


def test_hptq_compressed_and_dense_generate_the_same_tokens(tmp_path):
    tok = make_char_tokenizer()
    model = make_tiny_llama()
    ids = torch.tensor(tok(protocol_text()[:4000])["input_ids"])
    out = tmp_path / "hptq"
    cfg = HPTQConfig(target_bits=3.125, tol=0.05)
    run_quantize(model, tok, ids[: 4 * 64].view(4, 64), "hptq", cfg, out, progress=False)
    gen = GenerationConfig(max_new_tokens=24, chat=False)
    dense = load_quantized(out, cache_weight=True)
    compressed = load_quantized(out, cache_weight=False)
    a, b = generate(dense, tok, PROMPT, gen), generate(compressed, tok, PROMPT, gen)
    assert a.token_ids == b.token_ids
    kernels = {getattr(m, "last_kernel", None) for m in compressed.modules()} - {None}
    assert kernels == {"torch-huffman"}
    assert weight_memory(compressed)["cache"] == 0 < weight_memory(dense)["cache"]


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy():
    model, tok = make_tiny_llama(), make_char_tokenizer()

    def run(**kw):
        cfg = GenerationConfig(max_new_tokens=16, chat=False, **kw)
        return generate(model, tok, PROMPT, cfg).token_ids

    greedy = run()
    assert run(temperature=1.5, seed=1) == run(temperature=1.5, seed=1)
    assert run(temperature=1.5, seed=1) != run(temperature=1.5, seed=2)
    assert run(temperature=1.5, top_p=1e-9, seed=3) == greedy


def test_weight_memory_counts_every_tensor_once():
    model = make_tiny_llama()  # tied embeddings: the head shares the embedding's tensor
    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    expected -= model.lm_head.weight.numel() * 4
    buffers = sum(b.numel() * b.element_size() for _, b in model.named_buffers())
    non_persistent = buffers - sum(
        t.numel() * t.element_size() for k, t in model.state_dict().items() if "inv_freq" in k
    )
    assert weight_memory(model) == {"stored": expected + non_persistent, "cache": 0}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_generation_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kw)


def test_too_long_and_empty_prompts():
    model, tok = make_tiny_llama(), make_char_tokenizer()
    with pytest.raises(ValueError, match="positions"):
        generate(model, tok, "a", GenerationConfig(max_new_tokens=10_000, chat=False))
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, "", GenerationConfig(chat=False))
