"""Folded rotations: the same function in float64, on tiny random models of every family."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from runs import run_quantize
from tiny import (
    VOCAB,
    id_stream,
    make_char_tokenizer,
    make_tiny_llama,
    make_tiny_moe,
    make_tiny_opt,
)

import latticequant as lq
from latticequant.core.rotation import hadamard_rotation
from latticequant.pipeline import load_quantized
from latticequant.pipeline.fold import FOLD_FAMILIES, fold_rotations
from latticequant.pipeline.layout import UnsupportedModelError
from latticequant.pipeline.target import layer_seed

# 96 = 32 x 3 and head_dim 24 = 8 x 3: both rotations carry an odd orthogonal factor
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: two query heads per KV head
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
CONFIGS = {
    "llama": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),  # o and down biases
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q, k, v biases
    "qwen3": ("Qwen3Config", dict(head_dim=32)),  # 4 x 32 query features on a 96 stream
}


def _randomise(model: torch.nn.Module, seed: int, scale: float = 3.0) -> torch.nn.Module:
    """Norm scales away from one and biases away from zero, so that every fold is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif "embed" not in name:
                p.mul_(scale)
    return model


def make_family(family: str, seed: int = 0, dtype=torch.float64, **changes):
    import transformers

    name, extra = CONFIGS[family]
    config = getattr(transformers, name)(**{**SHAPE, **extra, **changes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return _randomise(model, seed + 1)


def _exact_norms(model: torch.nn.Module) -> torch.nn.Module:
    """RMSNorms in the input's dtype: transformers computes them in float32, which would hide
    the float64 equality under float32 rounding."""

    def forward(self, x):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)
    return model


IDS = id_stream(2 * 24, seed=5).view(2, 24)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FOLD_FAMILIES)
def test_folded_model_computes_the_same_function(family):
    model = _exact_norms(make_family(family))
    ref = copy.deepcopy(model)
    report = fold_rotations(model, seed=3)
    assert _rel(_logits(model), _logits(ref)) < 1e-10
    assert (report.family, report.layers, report.untied) == (family, 2, False)
    assert report.residual_size == 96
    assert report.head_size == model.model.layers[0].self_attn.head_dim
    for name, p in model.named_parameters():
        if name.endswith(("layernorm.weight", "model.norm.weight")):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3: act on q, k per head
            assert torch.equal(p, dict(ref.named_parameters())[name]), name
        elif p.dim() == 2:  # every matrix rotated
            assert not torch.allclose(p, dict(ref.named_parameters())[name]), name


def test_rotations_are_orthogonal_and_drawn_from_the_seed():
    model = make_family("qwen3")
    report = fold_rotations(model, seed=11)
    for r, size in ((report.residual, 96), (report.head, 32)):
        R = r.matrix()
        assert R.shape == (size, size)
        assert torch.allclose(R @ R.T, torch.eye(size, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(
        report.residual.matrix(), hadamard_rotation(96, report.residual_seed).matrix()
    )
    assert report.as_dict()["rotate"] == "folded"
    again, other = make_family("qwen3"), make_family("qwen3")
    fold_rotations(again, seed=11)
    fold_rotations(other, seed=12)
    w = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(again.state_dict()[w], model.state_dict()[w])
    assert not torch.allclose(other.state_dict()[w], model.state_dict()[w])


def test_tied_embeddings_are_untied():
    model = _exact_norms(make_family("llama", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = copy.deepcopy(model)
    report = fold_rotations(model, seed=0)
    assert report.untied and report.as_dict()["untied_embeddings"]
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    assert head is not embed and head.data_ptr() != embed.data_ptr()
    assert not torch.allclose(head, embed)
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # what a save or a reload would do: lm_head stays its own
    assert model.lm_head.weight is head
    assert _rel(_logits(model), _logits(ref)) < 1e-10


def test_tied_embeddings_stay_tied_when_the_final_norm_is_ones():
    """lm_head then reads ``E R1``, the rotated embedding itself: one tensor still serves both."""
    model = _exact_norms(make_family("llama", tie_word_embeddings=True))
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    ref = copy.deepcopy(model)
    report = fold_rotations(model, seed=0)
    assert not report.untied and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert _rel(_logits(model), _logits(ref)) < 1e-10


def _gemma3():
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    return transformers.Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize(
    "build, words",
    [
        (make_tiny_opt, "mean"),
        (_gemma3, "post-attention and post-feedforward norms"),
        (lambda: make_tiny_moe("mixtral"), "support llama"),
    ],
)
def test_other_architectures_are_refused_untouched(build, words):
    model = build()
    before = _state(model)
    with pytest.raises(UnsupportedModelError, match=words) as info:
        fold_rotations(model, seed=0)
    assert "\n" not in str(info.value)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_wrapped_layer_is_refused_untouched():
    """A quantized or wrapped layer holds no float matrix to rotate: nothing is folded."""
    model = make_family("qwen3")
    model.model.layers[1].mlp.up_proj = torch.nn.Sequential(model.model.layers[1].mlp.up_proj)
    before = _state(model)
    with pytest.raises(UnsupportedModelError, match="block 1's mlp.up_proj is not a float"):
        fold_rotations(model, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_online_down_rotations_are_recorded_and_apply_online():
    model = _exact_norms(make_family("mistral"))
    ref = copy.deepcopy(model)
    report = fold_rotations(model, seed=4, online_down=True)
    folded = _state(model)
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert list(report.online) == names
    assert report.as_dict()["online"] == dict.fromkeys(names, 160)
    for name in names:  # what --rotate hadamard draws for that layer
        expected = hadamard_rotation(160, layer_seed(4, name))
        assert torch.equal(report.online[name].matrix(), expected.matrix())
    # recorded only: the caller rotates W_down <- W_down R and applies x -> x R before it
    handles = []
    with torch.no_grad():
        for name, rotation in report.online.items():
            layer = model.get_submodule(name)
            assert torch.equal(layer.weight, folded[name + ".weight"])
            layer.weight.copy_(rotation.apply(layer.weight))
            handles.append(
                layer.register_forward_pre_hook(lambda m, args, r=rotation: (r.apply(args[0]),))
            )
    assert _rel(_logits(model), _logits(ref)) < 1e-10
    for handle in handles:
        handle.remove()


def test_online_down_refuses_an_odd_width_before_any_change():
    model = make_family("llama", intermediate_size=130)  # 2 x 65: no stored factor that large
    before = _state(model)
    with pytest.raises(UnsupportedModelError, match="down_proj.*odd factor 65"):
        fold_rotations(model, seed=0, online_down=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fold_rotations(model, seed=0)  # the folded rotations alone fit


def test_folded_float32_model_quantizes_and_reloads(tmp_path):
    """transformers' own float32 norms and the pipeline as it is: a folded model is ordinary,
    and its untied lm_head is saved and loaded as a tensor of its own."""
    model = _randomise(make_tiny_llama(0), 1, scale=1.0)  # its matrices are already scaled
    ref = copy.deepcopy(model)
    assert fold_rotations(model, seed=0).untied
    assert _rel(_logits(model), _logits(ref)) < 1e-4
    calib = id_stream(8 * 32).view(8, 32)
    config = lq.QuantConfig(bits=4, group_size=32)
    out = tmp_path / "folded"
    run_quantize(model, make_char_tokenizer(), calib, "gptq", config, out)
    logits = _logits(model)
    assert torch.isfinite(logits).all()
    assert _rel(logits, _logits(ref)) < 0.5  # 4 bits on a tiny random model: a smoke test
    loaded = load_quantized(out)
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert _rel(_logits(loaded), logits) < 1e-5


def test_low_precision_weights_are_rounded_once():
    """Every product in float64 and one rounding to the model's dtype: a bfloat16 model folds
    to exactly its float64 fold rounded to bfloat16."""
    model = make_family("qwen2", dtype=torch.bfloat16)
    wide = copy.deepcopy(model).to(torch.float64)
    fold_rotations(model, seed=2)
    fold_rotations(wide, seed=2)
    for name, p in model.state_dict().items():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, wide.state_dict()[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("rotate", ["folded", "folded+online"])
def test_a_folded_run_writes_an_ordinary_checkpoint_that_records_its_rotation(tmp_path, rotate):
    """--rotate folded through the run: the plan folds the float model (same function), the
    layers are quantized in the rotated basis, and the checkpoint loads to the very model the
    run left; folded+online stores down_proj's online rotation, and only down_proj's."""
    import json

    from latticequant.pipeline.target import TargetConfig

    model = _randomise(make_tiny_llama(0), 1, scale=1.0)
    calib = id_stream(8 * 32).view(8, 32)
    out = tmp_path / "q"
    config = lq.QuantConfig(bits=4, group_size=32)
    target = TargetConfig(rotate=rotate, seed=3)
    run_quantize(model, make_char_tokenizer(), calib, "gptq", config, out, target=target)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    record = qc["latticequant"]["rotation"]
    assert record["rotate"] == rotate and record["seed"] == 3
    log = json.loads((out / "quant_log.json").read_text())
    assert log["run"]["rotation"] == record
    formats = {n: m["format"] for n, m in qc["latticequant"]["modules"].items()}
    if rotate == "folded":
        assert set(formats.values()) == {"gptq"} and qc["quant_method"] == "gptq"
    else:
        assert {f for n, f in formats.items() if n.endswith("down_proj")} == {"gptq+hadamard"}
        assert {f for n, f in formats.items() if not n.endswith("down_proj")} == {"gptq"}
        assert qc["quant_method"] == "latticequant"
    loaded = load_quantized(out)
    assert _rel(_logits(loaded), _logits(model)) < 1e-5


def test_a_folded_checkpoint_runs_in_plain_transformers(tmp_path):
    """The folded model quantized into a format transformers reads itself (compressed-tensors,
    symmetric): transformers' own loader and ours give the same logits, with nothing applied
    at run time and the head untied."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from latticequant.pipeline.target import TargetConfig

    model = _randomise(make_tiny_llama(0), 1, scale=1.0)
    calib = id_stream(8 * 32).view(8, 32)
    out = tmp_path / "q"
    config = lq.QuantConfig(bits=4, group_size=32, sym=True)
    run_quantize(
        model, make_char_tokenizer(), calib, "gptq", config, out,
        checkpoint_format="compressed-tensors", target=TargetConfig(rotate="folded", seed=1),
    )  # fmt: skip
    ours = load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert theirs.config.tie_word_embeddings is False
    assert _rel(_logits(theirs), _logits(ours)) < 1e-5
    assert _rel(_logits(ours), _logits(model)) < 1e-5
