"""llama.cpp's type mix: the block-32 fallback on the protocol model, whose 576-wide layers no K
type can hold, as llama-quantize's own files of that model show it (docs/gguf.md), and the rules
of the mix one by one."""

from __future__ import annotations

from collections import Counter

import pytest

from latticequant.formats.gguf import GGMLType as T
from latticequant.formats.gguf.mix import (
    FileType,
    ModelShape,
    fallback,
    fallbacks,
    llama_order,
    llama_tensor_shapes,
    tensor_types,
    use_more_bits,
)

SMOL = llama_tensor_shapes(30, 576, 1536, 9, 3, 64, 49152, tied=True)
SMOL_SHAPE = ModelShape(30, 9, 3)


def kinds(types, part):
    return Counter(t.name for n, t in types.items() if part in n and t is not None)


def test_protocol_model_q4_k_m():
    """576-wide layers fall back to block-32 types (Q4_K -> Q5_0, Q6_K -> Q8_0); only ffn_down
    (1536 = 6 x 256) keeps K types; the tied embeddings become Q8_0."""
    types = tensor_types("Q4_K_M", SMOL, SMOL_SHAPE)
    assert types["token_embd.weight"] == T.Q8_0
    assert types["blk.0.attn_norm.weight"] is None and types["output_norm.weight"] is None
    assert kinds(types, "ffn_down") == {"Q6_K": 14, "Q4_K": 16}
    assert kinds(types, "attn_v") == {"Q8_0": 14, "Q5_0": 16}
    assert kinds(types, "blk.") == {"Q5_0": 166, "Q8_0": 14, "Q6_K": 14, "Q4_K": 16}
    wide = [n for n, ne in SMOL.items() if len(ne) == 2 and n.startswith("blk.") and ne[0] == 576]
    assert len(wide) == 180
    assert all(types[n] in (T.Q5_0, T.Q8_0) for n in wide)


def test_protocol_model_fallbacks_reported():
    """What the run's summary reports: the 180 576-wide matrices of Q4_K_M, each with the type
    the mix chose (Q4_K, or Q6_K for the attn_v layers that use more bits) and its block-32
    fallback; the tied embeddings are given Q8_0 directly (Q4_K's block does not divide their
    rows), while Q4_0's mix gives them Q6_K, which falls back to Q8_0."""
    fb = fallbacks("Q4_K_M", SMOL, SMOL_SHAPE)
    wide = {n for n, ne in SMOL.items() if len(ne) == 2 and n.startswith("blk.") and ne[0] == 576}
    assert set(fb) == wide
    assert Counter((a.name, b.name) for n, (a, b) in fb.items() if n in wide) == {
        ("Q4_K", "Q5_0"): 166,
        ("Q6_K", "Q8_0"): 14,
    }
    assert fallbacks("Q4_0", SMOL, SMOL_SHAPE) == {"token_embd.weight": (T.Q6_K, T.Q8_0)}
    assert all(n not in fb for n in SMOL if "ffn_down" in n)  # 1536 = 6 x 256 keeps K types
    types = tensor_types("Q4_K_M", SMOL, SMOL_SHAPE)
    assert all(types[n] == b for n, (_, b) in fb.items())


def test_protocol_model_q2_k_equals_q3_k_s():
    """Q2_K's extra bits (attn_v, attn_output -> Q3_K) fall back to Q4_0 as Q3_K_S's do."""
    q2 = tensor_types("Q2_K", SMOL, SMOL_SHAPE)
    assert q2 == tensor_types("Q3_K_S", SMOL, SMOL_SHAPE)
    assert kinds(q2, "blk.") == {"Q4_0": 180, "Q3_K": 30}
    assert q2["token_embd.weight"] == T.Q8_0


@pytest.mark.parametrize("ftype", [f.name for f in FileType])
def test_protocol_model_every_file_type(ftype):
    types = tensor_types(ftype, SMOL, SMOL_SHAPE)
    assert types["token_embd.weight"] == T.Q8_0
    for n, t in types.items():
        if t is not None:
            assert fallback(t, SMOL[n][0]) == t  # every chosen type's block divides its rows


def test_fallbacks():
    assert fallback(T.Q4_K, 576) == T.Q5_0
    assert fallback(T.Q5_K, 576) == T.Q5_1
    assert fallback(T.Q6_K, 576) == T.Q8_0
    assert fallback(T.Q3_K, 576) == T.Q4_0
    assert fallback(T.Q2_K, 576) == T.Q4_0
    assert fallback(T.Q2_0, 96) == T.Q4_0
    assert fallback(T.Q4_K, 1536) == T.Q4_K
    assert fallback(T.Q4_K, 100) == T.F16
    assert fallback(T.Q4_0, 100) == T.F16


def test_use_more_bits_and_order():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [
        0,
        1,
        2,
        5,
        8,
        11,
        14,
        17,
        20,
        23,
        26,
        27,
        28,
        29,
    ]
    assert llama_order(["blk.10.a", "output.weight", "blk.2.b", "blk.2.a"]) == [
        "output.weight",
        "blk.2.a",
        "blk.2.b",
        "blk.10.a",
    ]


def test_unknown_file_type():
    with pytest.raises(ValueError, match="unsupported file type"):
        tensor_types("IQ2_XXS", SMOL, SMOL_SHAPE)


def test_untied_embeddings_and_output():
    """Untied, ``output.weight`` takes the output rule (Q6_K, here Q8_0 after the fallback) and
    ``token_embd`` keeps the default type, but for Q2_0, which raises it to Q4_K (-> Q5_0)."""
    shapes = llama_tensor_shapes(30, 576, 1536, 9, 3, 64, 49152, tied=False)
    q4 = tensor_types("Q4_0", shapes, SMOL_SHAPE)
    assert q4["output.weight"] == T.Q8_0 and q4["token_embd.weight"] == T.Q4_0
    q2 = tensor_types("Q2_0", shapes, SMOL_SHAPE)
    assert q2["token_embd.weight"] == T.Q5_0
    assert tensor_types("Q8_0", shapes, SMOL_SHAPE)["output.weight"] == T.Q8_0
