"""Finding decoder blocks and linear layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latticequant.pipeline.layout import (
    UnsupportedModelError,
    describe_model,
    linear_weight,
    set_linear_weight,
)


def test_llama_layout(tiny_llama):
    layout = describe_model(tiny_llama)
    assert layout.architecture == "llama" and layout.block_path == "model.layers"
    assert len(layout.blocks) == 2
    assert layout.subsets[0] == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert layout.subsets[-1] == ("mlp.down_proj",)
    names = layout.linear_names()
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"
    assert "lm_head" not in " ".join(names) and "embed" not in " ".join(names)


def test_opt_layout(tiny_opt):
    layout = describe_model(tiny_opt)
    assert layout.architecture == "opt" and layout.block_path == "model.decoder.layers"
    assert [n for s in layout.subsets for n in s][-2:] == ["fc1", "fc2"]


def test_gpt2_conv1d_is_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)).eval()
    layout = describe_model(model)
    assert layout.architecture == "gpt2"
    conv = model.transformer.h[0].mlp.c_fc
    W = linear_weight(conv)
    assert W.shape == (128, 32)
    x = torch.randn(3, 32)
    assert torch.allclose(conv(x), x @ W.T + conv.bias, atol=1e-6)
    set_linear_weight(conv, torch.zeros_like(W))
    assert torch.equal(conv(x), conv.bias.expand(3, -1))


def test_generic_fallback_finds_blocks(tiny_llama):
    tiny_llama.config.model_type = "something_new"
    layout = describe_model(tiny_llama)
    assert layout.architecture == "generic" and layout.block_path == "model.layers"
    flat = [n for s in layout.subsets for n in s]
    assert sorted(flat) == sorted(
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )


def test_generic_fallback_on_a_plain_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.short = nn.ModuleList([Block()])
            self.layers = nn.ModuleList([Block() for _ in range(3)])

    layout = describe_model(Net())
    assert layout.block_path == "layers" and layout.subsets == (("a",), ("b",))


def test_unsupported_model_is_named():
    with pytest.raises(UnsupportedModelError, match="unsupported model Sequential"):
        describe_model(nn.Sequential(nn.ReLU(), nn.Linear(3, 3)))
    with pytest.raises(UnsupportedModelError):
        describe_model("not a model")
