"""Mixture-of-experts models: per-expert layers, routed-token Hessians, the fallback policies.

References are computed independently of the pipeline: routing from the fused model's own
router outputs (hooked), Hessians in float64 from those routed rows, the fused tensors' slices.
"""

from __future__ import annotations

import pytest
import torch
from runs import run_quantize
from tiny import MOE_FAMILIES, make_char_tokenizer, make_tiny_moe
from torch import nn

import latticequant as lq
from latticequant.checkpoint import load_quantized
from latticequant.formats import QuantLinear
from latticequant.methods import LayerQuant, Method
from latticequant.pipeline.experts import (
    ExpertMLP,
    ExpertPolicy,
    RoutedExperts,
    fused_expert_tensors,
    unfuse_experts,
)
from latticequant.pipeline.layout import UnsupportedModelError, describe_model

CFG = lq.QuantConfig(bits=4, group_size=16)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (6, 32), generator=g)


def _blocks_with_experts(model):
    return [i for i, b in enumerate(model.model.layers) if hasattr(b.mlp, "experts")]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unfused_experts_compute_what_the_fused_ones_do(family, ids):
    default = make_tiny_moe(family)  # transformers' grouped matmul over the fused tensors
    ref32 = default(ids).logits
    unfuse_experts(default)
    torch.testing.assert_close(default(ids).logits, ref32, rtol=1e-5, atol=1e-5)
    fused = make_tiny_moe(family).double()
    fused.config._experts_implementation = "eager"  # its float64 reference loop
    ref = fused(ids).logits
    slices = {
        i: (fused.model.layers[i].mlp.experts.gate_up_proj.detach().clone(),
            fused.model.layers[i].mlp.experts.down_proj.detach().clone())
        for i in _blocks_with_experts(fused)
    }  # fmt: skip
    assert fused_expert_tensors(fused)
    assert unfuse_experts(fused) == len(slices)
    assert unfuse_experts(fused) == 0 and not fused_expert_tensors(fused)
    for i, (gate_up, down) in slices.items():
        experts = fused.model.layers[i].mlp.experts
        assert isinstance(experts, RoutedExperts) and len(experts) == gate_up.shape[0]
        inter = down.shape[2]
        for e, expert in enumerate(experts):
            assert isinstance(expert, ExpertMLP)
            assert torch.equal(expert.gate_proj.weight, gate_up[e, :inter])
            assert torch.equal(expert.up_proj.weight, gate_up[e, inter:])
            assert torch.equal(expert.down_proj.weight, down[e])
    torch.testing.assert_close(fused(ids).logits, ref, rtol=1e-12, atol=1e-12)


def _layout_names(model):
    return describe_model(model).linear_names()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_expert_matrix_is_a_quantized_layer_and_routers_stay_float(family, ids, tmp_path):
    model = make_tiny_moe(family)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".gate." in n}
    routers.update(
        {n: p.detach().clone() for n, p in model.named_parameters() if "shared_expert_gate" in n}
    )
    n_experts = model.config.num_local_experts if family == "mixtral" else model.config.num_experts
    summary = run_quantize(model, make_char_tokenizer(), ids, "gptq", CFG, tmp_path / "q",
                             progress=False)  # fmt: skip
    names = {s["name"] for s in summary}
    expert_layers = {n for n in names if ".experts." in n}
    assert len(expert_layers) == 3 * n_experts * len(_blocks_with_experts(model))
    assert not summary.skipped
    assert all(not n.endswith(".gate") and "shared_expert_gate" not in n for n in names)
    if family == "qwen2_moe":
        assert {f"model.layers.{i}.mlp.shared_expert.down_proj" for i in (0, 1)} <= names
    if family == "qwen3_moe":  # block 1 is a dense MLP
        assert "model.layers.1.mlp.down_proj" in names
    loaded = load_quantized(tmp_path / "q")
    for name in names:
        assert isinstance(loaded.get_submodule(name), QuantLinear), name
    for name, before in routers.items():
        assert torch.equal(loaded.get_parameter(name), before), name
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def _recording_method(seen: list):
    """Keeps every weight as it is and records the Hessian each layer was given."""

    def quantize(W, H, config, context=None):
        seen.append((W.detach().clone(), H.detach().double().clone()))
        return LayerQuant(Q=W.clone(), tensors={}, stats={"loss": 0.0})

    return Method("recording", lq.QuantConfig, quantize, "gptq")  # used unregistered


def _routed_reference(model, ids):
    """Per block with experts: the experts' input (all tokens) and each token's chosen experts,
    hooked from the fused model's own forward (weights unchanged by the recording method)."""
    seen = {}

    def hook(index):
        def fn(module, args):
            seen[index] = (args[0].detach().double(), args[1].detach())

        return fn

    handles = [
        model.model.layers[i].mlp.experts.register_forward_pre_hook(hook(i))
        for i in _blocks_with_experts(model)
    ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def _find(seen, weight):
    hits = [H for W, H in seen if W.shape == weight.shape and torch.equal(W, weight)]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("batch_size", [None, 4])
def test_expert_hessians_come_from_routed_tokens_only(family, batch_size, ids):
    model = make_tiny_moe(family)
    reference = _routed_reference(model, ids)
    seen = []
    summary = run_quantize(model, make_char_tokenizer(), ids, _recording_method(seen), CFG,
                             batch_size=batch_size, progress=False,
                             experts=ExpertPolicy(min_tokens=1))  # fmt: skip
    stats = {s["name"]: s for s in summary}
    for i, (x, chosen) in reference.items():
        experts = model.model.layers[i].mlp.experts
        for e, expert in enumerate(experts):
            rows = (chosen == e).any(dim=-1)
            xe = x[rows]
            name = f"model.layers.{i}.mlp.experts.{e}"
            assert stats[f"{name}.gate_proj"]["expert_tokens"] == int(rows.sum())
            if not rows.any():
                continue
            H = _hessian(xe)
            torch.testing.assert_close(
                _find(seen, expert.gate_proj.weight), H, rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(_find(seen, expert.up_proj.weight), H, rtol=1e-5, atol=1e-6)
            w = {k: getattr(expert, k).weight.double() for k in ("gate_proj", "up_proj")}
            inner = nn.functional.silu(xe @ w["gate_proj"].T) * (xe @ w["up_proj"].T)
            torch.testing.assert_close(
                _find(seen, expert.down_proj.weight), _hessian(inner), rtol=1e-4, atol=1e-6
            )


def test_fallback_policies_use_all_tokens_an_identity_or_float(ids, tmp_path):
    family = "qwen3_moe"
    reference = _routed_reference(make_tiny_moe(family), ids)
    x, chosen = reference[0]
    counts = torch.stack([(chosen == e).any(dim=-1).sum() for e in range(6)])
    threshold = int(counts.float().median()) + 1  # about half the experts fall short
    short = [e for e in range(6) if counts[e] < threshold]
    assert 0 < len(short) < 6

    for policy in ("all-tokens", "rtn"):
        model, seen = make_tiny_moe(family), []
        summary = run_quantize(model, make_char_tokenizer(), ids, _recording_method(seen), CFG,
                                 progress=False,
                                 experts=ExpertPolicy(threshold, policy))  # fmt: skip
        stats = {s["name"]: s for s in summary}
        for e in range(6):
            expert = model.model.layers[0].mlp.experts[e]
            s = stats[f"model.layers.0.mlp.experts.{e}.up_proj"]
            assert s["expert_tokens"] == int(counts[e])
            assert s["expert_fallback"] == (policy if e in short else None)
            H = _find(seen, expert.up_proj.weight)
            if e not in short:
                continue
            if policy == "rtn":
                assert torch.equal(H, torch.eye(H.shape[0], dtype=H.dtype))
            else:  # every token of the block, as if all were routed here
                torch.testing.assert_close(H, _hessian(x), rtol=1e-5, atol=1e-6)
                w = {k: getattr(expert, k).weight.double() for k in ("gate_proj", "up_proj")}
                inner = nn.functional.silu(x @ w["gate_proj"].T) * (x @ w["up_proj"].T)
                torch.testing.assert_close(
                    _find(seen, expert.down_proj.weight), _hessian(inner), rtol=1e-4, atol=1e-6
                )

    model, seen = make_tiny_moe(family), []
    summary = run_quantize(model, make_char_tokenizer(), ids, _recording_method(seen), CFG,
                             progress=False, experts=ExpertPolicy(threshold, "float"))  # fmt: skip
    kept = {n for n, why in summary.skipped.items() if why.startswith("expert fallback float")}
    in_block_0 = {n for n in kept if n.startswith("model.layers.0.")}
    assert in_block_0 == {f"model.layers.0.mlp.experts.{e}.{k}" for e in short
                          for k in ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
    for e in short:  # never handed to the method
        expert = model.model.layers[0].mlp.experts[e]
        assert not any(torch.equal(W, expert.up_proj.weight) for W, _ in seen)
        assert f"({int(counts[e])} routed tokens)" in summary.skipped[f"{kept_name(e)}"]

    model = make_tiny_moe(family)
    out = tmp_path / "float"
    summary = run_quantize(model, make_char_tokenizer(), ids, "gptq", CFG, out, progress=False,
                             experts=ExpertPolicy(threshold, "float"))  # fmt: skip
    kept = {n for n, why in summary.skipped.items() if why.startswith("expert fallback float")}
    assert kept and all(".experts." in n for n in kept)
    loaded = load_quantized(out)
    for name in kept:
        layer = loaded.get_submodule(name)
        assert type(layer) is nn.Linear
        assert torch.equal(layer.weight, model.get_submodule(name).weight)
    for s in summary:
        assert isinstance(loaded.get_submodule(s["name"]), QuantLinear)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def kept_name(e: int) -> str:
    return f"model.layers.0.mlp.experts.{e}.gate_proj"


def _starve_expert(model, e: int, unless=None) -> None:
    """No token goes to expert ``e`` (but those where ``unless(hidden)`` holds): each router's
    choice of it is moved to an expert the token did not choose (a forward hook on the router,
    as if its logit were -inf)."""

    def hook(module, args, out):
        logits, scores, index = out
        index = index.clone()
        keep = None if unless is None else unless(args[0])
        for row in range(index.shape[0]):
            for slot in range(index.shape[1]):
                if int(index[row, slot]) == e and not (keep is not None and keep[row]):
                    taken = set(index[row].tolist())
                    index[row, slot] = next(j for j in range(module.num_experts) if j not in taken)
        return logits, scores, index

    for i in _blocks_with_experts(model):
        model.model.layers[i].mlp.gate.register_forward_hook(hook)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_expert_no_token_reaches_still_gets_a_finite_grid(ids, tmp_path, dtype):
    model = make_tiny_moe("mixtral").to(dtype)
    _starve_expert(model, 2)
    out = tmp_path / "q"
    summary = run_quantize(model, make_char_tokenizer(), ids, "gptq", CFG, out, progress=False,
                             experts=ExpertPolicy(min_tokens=0))  # fmt: skip
    stats = {s["name"]: s for s in summary}
    for i in (0, 1):
        s = stats[f"model.layers.{i}.mlp.experts.2.down_proj"]
        assert s["expert_tokens"] == 0 and s["expert_fallback"] == "all-tokens"
    loaded = load_quantized(out)
    for i in (0, 1):
        for k in ("gate_proj", "up_proj", "down_proj"):
            layer = loaded.get_submodule(f"model.layers.{i}.mlp.experts.2.{k}")
            assert isinstance(layer, QuantLinear)
            assert torch.isfinite(layer.scales).all() and (layer.scales > 0).all()
    assert torch.isfinite(loaded(ids).logits).all()


def test_batching_changes_nothing_but_rounding(ids, tmp_path):
    from safetensors.torch import load_file

    outs, rare = [], []
    for batch_size in (None, 1, 2):
        model = make_tiny_moe("qwen2_moe")
        _starve_expert(model, 5)  # an expert that runs in no batch at all
        _starve_expert(model, 4, unless=lambda h: h[:, 0] > 1.0)  # one that skips some
        out = tmp_path / f"b{batch_size}"
        summary = run_quantize(model, make_char_tokenizer(), ids, "gptq", CFG, out,
                                 progress=False, batch_size=batch_size,
                                 experts=ExpertPolicy(min_tokens=1))  # fmt: skip
        outs.append(load_file(out / "model.safetensors"))
        rare.append([s["expert_tokens"] for s in summary if ".experts.4.up" in s["name"]])
    assert all(0 < n < 32 for n in rare[0])  # a few tokens only, from a few windows
    for other in outs[1:]:  # the Hessians' summation is fixed; expert matmuls over another
        assert other.keys() == outs[0].keys()  # number of routed rows may round otherwise
        for key in outs[0]:
            if outs[0][key].is_floating_point():
                torch.testing.assert_close(other[key], outs[0][key], rtol=1e-3, atol=1e-5)
            else:
                assert (other[key] == outs[0][key]).double().mean() > 0.99, key


def test_fused_experts_of_an_unknown_family_are_refused():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = nn.Parameter(torch.zeros(4, 8, 8))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.experts = Experts()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(UnsupportedModelError, match="fused"):
        describe_model(Model())
    fused = make_tiny_moe("qwen3_moe")
    with pytest.raises(UnsupportedModelError, match="unfuse_experts"):
        describe_model(fused)


def test_bad_policies():
    with pytest.raises(ValueError, match="--expert-fallback"):
        ExpertPolicy(fallback="none")
    with pytest.raises(ValueError, match="--min-expert-tokens"):
        ExpertPolicy(min_tokens=-1)
