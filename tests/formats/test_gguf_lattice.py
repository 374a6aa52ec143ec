"""The grid methods on the exact grids of llama.cpp's types: llama.cpp's scales, codes decoded
with error feedback, blocks that gguf's own dequantizer reads to the same weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from latticequant.core.config import QuantConfig
from latticequant.core.gptq import gptq_quantize
from latticequant.core.grid import static_grid
from latticequant.formats.gguf.format import GGUF_TYPES, GgufFormat, check_gguf_type
from latticequant.formats.protocol import UnsupportedConfigError
from latticequant.methods import get_method
from latticequant.methods.registry import LayerContext


def _problem(d_out=32, d_in=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, d_in, generator=g, dtype=torch.float64)
    X = X @ (
        torch.eye(d_in, dtype=torch.float64)
        + 0.3 * torch.randn(d_in, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    )
    H = X.T @ X / X.shape[0]
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    return W, H


@pytest.mark.parametrize("ftype", GGUF_TYPES)
def test_blocks_read_back_by_gguf_to_the_method_weights(ftype):
    W, H = _problem()
    fmt = GgufFormat(ftype)
    losses = {}
    for name in ("rtn", "gptq", "babai", "kbest"):
        method = get_method(name)
        lq = method.quantize(
            W, H, method.config_cls(), LayerContext(fmt, "model.layers.0.mlp.up_proj")
        )
        t = int(lq.tensors["gguf_type"])
        data = lq.tensors["gguf_blocks"].numpy()
        if t in {int(q) for q in gguf.GGMLQuantizationType}:
            ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(t))
            assert np.array_equal(ref, lq.Q.numpy())
        assert torch.equal(fmt.dequantize(lq.tensors, {}), lq.Q)
        losses[name] = lq.stats["loss"]
    # error feedback on the same grid beats rounding on it; K-best keeps Babai's point or better
    assert losses["gptq"] < losses["rtn"] and losses["babai"] < losses["rtn"]
    assert losses["kbest"] <= losses["babai"] * (1 + 1e-9)


def test_act_order_changes_only_the_decode_order():
    W, H = _problem()
    fmt = GgufFormat("Q4_K_M")
    method = get_method("gptq")
    ctx = LayerContext(fmt, "model.layers.0.mlp.up_proj")
    natural = method.quantize(W, H, QuantConfig(), ctx)
    act = method.quantize(W, H, QuantConfig(order="act"), ctx)
    a, b = fmt.unpack(natural.tensors, {})[1], fmt.unpack(act.tensors, {})[1]
    assert np.array_equal(a.d, b.d) and np.array_equal(a.sc, b.sc) and np.array_equal(a.m, b.m)


def test_real_offsets_need_the_flag():
    W = torch.randn(4, 64, dtype=torch.float64)
    cfg = QuantConfig(bits=4, group_size=32)
    S = torch.full((4, 2), 0.1, dtype=torch.float64)
    Z = torch.full((4, 2), 7.3, dtype=torch.float64)
    with pytest.raises(ValueError, match="integers"):
        static_grid(W, cfg, S, Z)
    S2, Z2 = static_grid(W, cfg, -S, Z, integer_zeros=False)  # negative scales too (Q6_K's sc)
    assert torch.equal(Z2, Z) and (S2 < 0).all()
    H = torch.eye(64, dtype=torch.float64)
    r = gptq_quantize(W, H, cfg, scales=S, zeros=Z, integer_zeros=False)
    assert torch.allclose(r.Q, 0.1 * (r.codes.to(torch.float64) - 7.3)[:, :])


def test_wrong_type_name_is_one_line():
    with pytest.raises(UnsupportedConfigError) as err:
        check_gguf_type("Q4_K")
    assert "\n" not in str(err.value) and "Q4_K_M" in str(err.value)


def test_block_width_refused():
    with pytest.raises(UnsupportedConfigError, match="multiple of 32"):
        GgufFormat("Q4_0").check(QuantConfig(), 8, 40)


@pytest.mark.parametrize("ftype", ["Q4_0", "IQ4_NL", "Q4_K_M"])
def test_refine_cd_moves_codes_on_the_fixed_grid(ftype):
    W, H = _problem()
    fmt = GgufFormat(ftype)
    method = get_method("gptq")
    ctx = LayerContext(fmt, "model.layers.0.mlp.up_proj")
    plain = method.quantize(W, H, QuantConfig(), ctx)
    cfg = QuantConfig(refine="cd")
    fmt.check(cfg, *W.shape)  # codes only: accepted
    refined = method.quantize(W, H, cfg, ctx)
    a, b = fmt.unpack(plain.tensors, {})[1], fmt.unpack(refined.tensors, {})[1]
    for name in a.info.params:  # the block fit's scales are untouched
        assert np.array_equal(getattr(a, name), getattr(b, name))
    # the loss of the weights as stored, in float64 here: no single-code move left undone
    # raises it, and it is what gguf's dequantizer reads
    E0, E1 = (W.double() - plain.Q.double()), (W.double() - refined.Q.double())
    l0, l1 = float(((E0 @ H) * E0).sum()), float(((E1 @ H) * E1).sum())
    assert l1 < l0
    t = gguf.GGMLQuantizationType(int(refined.tensors["gguf_type"]))
    ref = gguf.quants.dequantize(refined.tensors["gguf_blocks"].numpy(), t)
    assert np.array_equal(ref, refined.Q.numpy())


def test_refine_scales_refused_with_what_to_use():
    with pytest.raises(UnsupportedConfigError, match="--refine cd") as err:
        GgufFormat("Q4_K_M").check(QuantConfig(refine="cd,scales"), 8, 256)
    assert "\n" not in str(err.value)


def test_run_notes_name_the_fallbacks():
    from transformers import LlamaConfig

    smol = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    )  # fmt: skip
    (note,) = GgufFormat().for_model(smol, {"gguf_type": "Q4_K_M"}).run_notes()
    assert "180 tensors" in note and "166 Q4_K -> Q5_0" in note and "14 Q6_K -> Q8_0" in note
    wide = LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=512, tie_word_embeddings=True,
    )  # fmt: skip
    assert GgufFormat().for_model(wide, {"gguf_type": "Q4_K_M"}).run_notes() == []
