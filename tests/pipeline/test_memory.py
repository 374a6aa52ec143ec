"""The memory estimate that refuses a run before its first forward."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny import make_tiny_llama

from latticequant.pipeline.layout import describe_model
from latticequant.pipeline.memory import (
    InsufficientMemoryError,
    check_memory,
    estimate_block_memory,
)


def test_the_estimate_follows_windows_batches_and_dtype():
    model = make_tiny_llama()
    layout = describe_model(model)
    a = estimate_block_memory(layout, 64, 128, 64, torch.float32, config=model.config)
    b = estimate_block_memory(layout, 128, 128, 64, torch.float32, config=model.config)
    c = estimate_block_memory(layout, 64, 128, 8, torch.float32, config=model.config)
    d = estimate_block_memory(layout, 64, 128, 64, torch.bfloat16, config=model.config)
    assert b.hidden == 2 * a.hidden and b.activations == a.activations
    assert c.activations * 8 == a.activations and c.hidden == a.hidden
    assert d.hidden * 2 == a.hidden
    # hidden states of the block's inputs and outputs: 2 x tokens x hidden size x 4 bytes
    assert a.hidden == 2 * 64 * 128 * model.config.hidden_size * 4
    # the rotated Hessian: one more float64 matrix of the widest input (down_proj's)
    e = estimate_block_memory(layout, 64, 128, 64, torch.float32, config=model.config, rotated=True)
    assert e.hessians - a.hessians == model.config.intermediate_size**2 * 8
    # the float-outputs copy's inputs, held for all four groups at once in one pass: q/k/v,
    # o_proj and gate/up read the hidden size, down_proj the intermediate size
    f = estimate_block_memory(layout, 64, 128, 64, torch.float32, config=model.config,
                              float_copy=True)  # fmt: skip
    widths = 3 * model.config.hidden_size + model.config.intermediate_size
    assert f.activations - a.activations == 64 * 128 * widths * 4
    assert f.hidden == 2 * a.hidden


def test_a_run_that_cannot_fit_is_refused_naming_the_flags():
    model = make_tiny_llama()
    need = estimate_block_memory(describe_model(model), 64, 128, 64, torch.float32)
    check_memory(need, torch.device("cpu"), available=need.total)
    with pytest.raises(InsufficientMemoryError) as info:
        check_memory(need, torch.device("cpu"), available=need.total // 2)
    message = str(info.value)
    assert "--nsamples" in message and "--offload" in message and "--device" in message
    assert "\n" not in message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_after_every_block(monkeypatch):
    """Without the trim a run's resident memory grows block by block (glibc keeps freed heap
    pages; measured in docs/bench_dtypes.md); the run gives them back after each block."""
    from runs import run_quantize
    from tiny import id_stream

    from latticequant import QuantConfig
    from latticequant.pipeline import memory, run

    assert memory.release_freed_memory() is True
    calls = []
    monkeypatch.setattr(run, "release_freed_memory", lambda: calls.append(1) or True)
    model = make_tiny_llama(num_hidden_layers=3)
    ids = id_stream(8 * 32).view(8, 32)
    run_quantize(model, None, ids, "rtn", QuantConfig(bits=4, group_size=32), progress=False)
    assert len(calls) == 3
