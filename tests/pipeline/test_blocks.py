"""One block's layers quantized group by group: batching changes no bit, a group whose layers
do not share an input is an error, and the bank of Hessians keeps no input alive longer than
its group needs it."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from runs import run_quantize
from tiny import GROUP, id_stream, make_tiny_llama

import latticequant as lq
from latticequant.pipeline.blocks import HessianBank
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
        run_quantize(model, None, _calib(), "gptq", _cfg(), batch_size=batch_size, progress=False)
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
        run_quantize(make_tiny_llama(), None, _calib(), "gptq", _cfg(), progress=False)


def test_the_bank_lets_an_earlier_groups_input_go():
    """Once the next group's input arrives, the bank holds the earlier input only weakly: the
    forward's own references decide when it is freed, not the end of the block. A tensor that
    is still alive is still found, so layers reading it share one accumulator."""
    bank = HessianBank(torch.float32, "cpu")
    bank.new_batch()
    first, second = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    bank.add("q", first, None)
    gone = weakref.ref(first)
    bank.add("o", second, None)
    bank.add("k", second, None)  # the same tensor as o's: one accumulator
    assert bank.get("k") is bank.get("o")
    del first
    gc.collect()
    assert gone() is None
    assert bank.input_of("q") is None
    assert bank.input_of("o") is second  # the latest input stays for its group's later layers
