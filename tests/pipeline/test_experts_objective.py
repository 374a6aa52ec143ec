"""The float-outputs objective on mixture-of-experts models.

An expert layer answers for the tokens the *quantized* router sends it; its float input there is
the float block's at those same tokens (the experts' input for ``gate_proj``/``up_proj``, the
float expert's intermediate for ``down_proj``). The references are computed here from hooked
activations of plain transformers models, in float64, never from the pipeline's Gram matrices.
"""

from __future__ import annotations

import pytest
import torch
from runs import run_quantize
from tiny import id_stream, make_tiny_moe
from torch import nn

import latticequant as lq
from latticequant.methods import Method, get_method
from latticequant.pipeline.experts import ExpertPolicy
from latticequant.pipeline.layout import set_linear_weight
from latticequant.pipeline.target import TargetConfig

EXPERTS = "model.layers.0.mlp.experts"
ATTENTION = [f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]


@pytest.fixture(scope="module")
def calib():
    return id_stream(16 * 64).view(16, 64)


@pytest.fixture(scope="module")
def heldout():
    return id_stream(6 * 64, seed=7).view(6, 64)


def _last_block_error(model, ref, ids) -> float:
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        b = ref(input_ids=ids, use_cache=False, output_hidden_states=True)
    return float((a.hidden_states[-1] - b.hidden_states[-1]).pow(2).mean())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_float_outputs_lowers_the_block_output_error(family, calib, heldout):
    """Held-out windows, the last block's output against the float model's, summed over three
    random models (one Mixtral alone gains a few per cent, others a third)."""
    errs = {"layer": 0.0, "float-outputs": 0.0}
    for seed in range(3):
        ref = make_tiny_moe(family, seed)
        for objective in errs:
            model = make_tiny_moe(family, seed)
            config = lq.QuantConfig(bits=2, group_size=16, order="act")
            run_quantize(model, None, calib, "gptq", config, target=TargetConfig(objective))
            errs[objective] += _last_block_error(model, ref, heldout)
    assert errs["float-outputs"] < 0.9 * errs["layer"], errs


def _recording(seen: dict) -> Method:
    """GPTQ that records, by layer name, the target point and Hessian it was handed and Q."""
    gptq = get_method("gptq")

    def quantize(W, H, config, context=None):
        result = gptq.quantize(W, H, config, context)
        seen[context.name] = (W.detach().clone(), H.detach().clone(), result.Q.detach().clone())
        return result

    return Method("recording", lq.QuantConfig, quantize, "gptq", check=gptq.check)


def _experts_input(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's experts' input (every token) and each token's chosen experts, hooked from the
    fused transformers module."""
    seen = {}

    def hook(module, args):
        seen["x"], seen["chosen"] = args[0].detach(), args[1].detach()

    handle = model.get_submodule(EXPERTS).register_forward_pre_hook(hook)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return seen["x"], seen["chosen"]


def _target(x_quant: torch.Tensor, x_float: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The undamped float-outputs target: the least-squares ``T`` with ``X~ T^T = X W^T``."""
    return torch.linalg.lstsq(x_quant, x_float @ W.T).solution.T


def _expert_weights(model, e: int) -> dict[str, torch.Tensor]:
    fused = model.get_submodule(EXPERTS)
    inter = fused.down_proj.shape[2]
    gate_up = fused.gate_up_proj.detach()
    return {
        "gate_proj": gate_up[e, :inter],
        "up_proj": gate_up[e, inter:],
        "down_proj": fused.down_proj.detach()[e],
    }


def _intermediate(x, gate, up):
    return nn.functional.silu(x @ gate.T) * (x @ up.T)


def _run(calib, policy: ExpertPolicy):
    seen: dict = {}
    model = make_tiny_moe("qwen3_moe").double()
    summary = run_quantize(
        model, None, calib, _recording(seen), lq.QuantConfig(bits=2, group_size=16),
        hessian_dtype=torch.float64, experts=policy,
        target=TargetConfig("float-outputs", damp=0.0),
    )  # fmt: skip
    # the float model, and one whose block 0 attention is the run's quantized one
    float_model, partly = make_tiny_moe("qwen3_moe").double(), make_tiny_moe("qwen3_moe").double()
    for m in (float_model, partly):
        m.config._experts_implementation = "eager"  # transformers' float64 loop
    for name in ATTENTION:
        set_linear_weight(partly.get_submodule(name), seen[name][2])
    x_float, chosen_float = _experts_input(float_model, calib)
    x_quant, chosen = _experts_input(partly, calib)
    return seen, summary, float_model, (x_float, chosen_float), (x_quant, chosen)


def test_an_expert_targets_the_float_block_on_the_tokens_the_quantized_router_sends(calib):
    """gate_proj: the float block's expert input at the quantized router's tokens; down_proj:
    the float expert's intermediate there, against the quantized gate and up's."""
    seen, summary, float_model, (x_float, chosen_float), (x_quant, chosen) = _run(
        calib, ExpertPolicy(min_tokens=1)
    )
    stats = {s["name"]: s for s in summary}
    moved = [int(((chosen == e).any(-1) != (chosen_float == e).any(-1)).sum()) for e in range(6)]
    e = max(range(6), key=lambda i: moved[i])  # the expert whose tokens moved the most
    assert moved[e] > 0  # the routings differ: the float router's tokens would be wrong here
    rows = (chosen == e).any(dim=-1)
    name = f"{EXPERTS}.{e}"
    assert stats[f"{name}.gate_proj"]["expert_tokens"] == int(rows.sum())
    W = _expert_weights(float_model, e)
    xq, xf = x_quant[rows], x_float[rows]
    T, _, Q_gate = seen[f"{name}.gate_proj"]
    ref = _target(xq, xf, W["gate_proj"])
    torch.testing.assert_close(T, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    other = (chosen_float == e).any(dim=-1)  # the float router's tokens give another target
    assert not torch.allclose(T, _target(x_quant[other], x_float[other], W["gate_proj"]))
    Q_up = seen[f"{name}.up_proj"][2]
    T, _, _ = seen[f"{name}.down_proj"]
    inner_q = _intermediate(xq, Q_gate, Q_up)
    inner_f = _intermediate(xf, W["gate_proj"], W["up_proj"])
    ref = _target(inner_q, inner_f, W["down_proj"])
    torch.testing.assert_close(T, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.parametrize("fallback", ["all-tokens", "rtn"])
def test_a_fallback_expert_targets_every_token_or_its_own_weights(calib, fallback):
    """An expert under --min-expert-tokens: with all-tokens, the float block on every token
    against the quantized block on every token; with rtn (an identity Hessian), W itself."""
    seen, summary, float_model, (x_float, _), (x_quant, chosen) = _run(
        calib, ExpertPolicy(min_tokens=10**6, fallback=fallback)
    )
    stats = {s["name"]: s for s in summary}
    e = 0
    name = f"{EXPERTS}.{e}"
    assert stats[f"{name}.gate_proj"]["expert_tokens"] == int((chosen == e).any(-1).sum())
    assert stats[f"{name}.gate_proj"]["expert_fallback"] == fallback
    W = _expert_weights(float_model, e)
    T_gate, H, Q_gate = seen[f"{name}.gate_proj"]
    T_down = seen[f"{name}.down_proj"][0]
    if fallback == "rtn":
        assert torch.equal(H, torch.eye(H.shape[0], dtype=H.dtype))
        assert torch.equal(T_gate, W["gate_proj"]) and torch.equal(T_down, W["down_proj"])
        return
    ref = _target(x_quant, x_float, W["gate_proj"])
    torch.testing.assert_close(T_gate, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    inner_q = _intermediate(x_quant, Q_gate, seen[f"{name}.up_proj"][2])
    inner_f = _intermediate(x_float, W["gate_proj"], W["up_proj"])
    ref = _target(inner_q, inner_f, W["down_proj"])
    torch.testing.assert_close(T_down, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
