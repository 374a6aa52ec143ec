"""One block's layers quantized group by group: batching changes no bit, and a group whose
layers do not share an input is an error."""

from __future__ import annotations

import pytest
import torch
from tiny import GROUP, id_stream, make_tiny_llama

import latticequant as lq
from latticequant.pipeline import quantize_model
from latticequant.pipeline.layout import ARCHITECTURES, Architecture


def _calib(n=6, seqlen=24):
    return id_stream(n * seqlen, seed=3).view(n, seqlen)


def _codes(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "proj" in k}


def _cfg():
    return lq.QuantConfig(bits=3, group_size=GROUP, order="act", sym=False)


def test_batching_changes_no_bit():
    """One pass over all windows, passes of 4 and of 1 window (each group captured by its own
    pass): the Hessians are summed in one fixed tree over the windows, so the quantized weights
    are identical, not merely close."""
    torch.set_num_threads(1)
    results = []
    for batch_size in (None, 4, 1):
        model = make_tiny_llama()
        quantize_model(model, None, _calib(), "gptq", _cfg(), batch_size=batch_size, progress=False)
        results.append(_codes(model))
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_a_group_whose_layers_read_different_inputs_is_an_error(monkeypatch):
    """The description says q_proj and o_proj share an input; they do not."""
    subsets = (
        ("self_attn.q_proj", "self_attn.o_proj"),
        ("self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    monkeypatch.setitem(ARCHITECTURES, "llama", Architecture("llama", "model.layers", subsets))
    with pytest.raises(RuntimeError, match="o_proj does not read the same input as .*q_proj"):
        quantize_model(make_tiny_llama(), None, _calib(), "gptq", _cfg(), progress=False)
