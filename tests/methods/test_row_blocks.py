"""The grid methods solve a layer in fixed row blocks: blocks solved in any order, each on a
factor of its own (as ranks solve them), combine to the very result of one call."""

from __future__ import annotations

import random

import pytest
import torch

from latticequant.core.config import QuantConfig
from latticequant.methods.grid import KBestConfig
from latticequant.methods.registry import (
    CHUNK_MIN_ROWS,
    ROW_BLOCK_ENV,
    ROW_CHUNKS,
    get_method,
    min_chunk_rows,
    row_chunks,
)


def test_row_blocks_depend_on_the_rows_alone_and_cover_them_once():
    for d_out in (1, 15, 16, 17, 31, 64, 104, 1000, 4096, 14336):
        chunks = row_chunks(d_out)
        assert chunks[0][0] == 0 and chunks[-1][1] == d_out
        assert all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:]))
        assert len(chunks) <= ROW_CHUNKS
        if d_out >= min_chunk_rows():
            assert min(b - a for a, b in chunks) >= min_chunk_rows()
        assert max(b - a for a, b in chunks) - min(b - a for a, b in chunks) <= 1


def test_by_default_small_layers_stay_whole_and_large_ones_split_eight_ways(monkeypatch):
    monkeypatch.delenv(ROW_BLOCK_ENV, raising=False)
    assert CHUNK_MIN_ROWS == 512
    assert row_chunks(576) == [(0, 576)] and row_chunks(192) == [(0, 192)]
    assert row_chunks(1536) == [(0, 512), (512, 1024), (1024, 1536)]
    assert len(row_chunks(4096)) == 8 and len(row_chunks(14336)) == 8
    assert row_chunks(1024) == [(0, 512), (512, 1024)]


@pytest.mark.parametrize("value", ["0", "-3", "many", "1.5"])
def test_a_bad_row_block_setting_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv(ROW_BLOCK_ENV, value)
    with pytest.raises(ValueError, match=ROW_BLOCK_ENV):
        row_chunks(64)


def _problem(d_out=104, d_in=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    X = torch.randn(400, d_in, generator=g) * torch.linspace(0.2, 2.0, d_in)
    H = X.T @ X / 400
    H[5, :] = H[:, 5] = 0  # a dead input
    return W, H


CASES = [
    ("rtn", QuantConfig(bits=4, group_size=32)),
    ("gptq", QuantConfig(bits=4, group_size=32, order="act")),
    ("gptq", QuantConfig(bits=4, group_size=16, static_groups=False, order="act")),
    ("gptq", QuantConfig(bits=4, group_size=32, refine="cd,scales")),
    ("babai", QuantConfig(bits=4, group_size=32, order="act")),
    ("babai", QuantConfig(bits=4, group_size=16, static_groups=False)),
    ("kbest", KBestConfig(bits=4, group_size=32, beam=3, klein_paths=4, seed=7)),
    ("kbest", KBestConfig(bits=4, group_size=32, beam=2, refine="cd")),
]


@pytest.mark.parametrize(("name", "config"), CASES, ids=lambda c: getattr(c, "name", None))
def test_blocks_solved_apart_combine_to_the_one_call(name, config):
    method = get_method(name)
    W, H = _problem()
    context = method.context()
    whole = method.quantize(W, H, config, context)
    chunks = row_chunks(W.shape[0])
    assert len(chunks) == 6  # 104 rows: blocks of 17 and 18
    order = list(range(len(chunks)))
    random.Random(1).shuffle(order)
    parts = []
    for i in order:  # each block as a rank would solve it: its own factor, in any order
        a, b = chunks[i]
        parts.append(method.rows.solve(W[a:b], H, config, context, a, {}))
    split = method.rows.combine(parts, W, config, context)
    assert whole.tensors.keys() == split.tensors.keys()
    for k in whole.tensors:
        assert torch.equal(whole.tensors[k], split.tensors[k]), k
    assert torch.equal(whole.Q, split.Q)
    for key in ("loss", "rtn_loss", "gptq_loss", "bound", "clipped", "bits_per_weight"):
        assert whole.stats[key] == split.stats[key], key
    if config.refine_steps:
        assert whole.stats["loss_before_refine"] == split.stats["loss_before_refine"]


def test_klein_paths_are_drawn_per_block():
    """A block draws the same paths whatever else is solved: its seed is its own."""
    method = get_method("kbest")
    config = KBestConfig(bits=4, group_size=32, beam=1, klein_paths=6, seed=3)
    W, H = _problem()
    context = method.context()
    a, b = row_chunks(W.shape[0])[2]
    alone = method.rows.solve(W[a:b], H, config, context, a, {})
    whole = method.quantize(W, H, config, context)
    codes = whole.tensors  # the block's rows of the combined layer are its codes
    again = method.rows.combine(
        [
            alone if (x, y) == (a, b) else method.rows.solve(W[x:y], H, config, context, x, {})
            for x, y in row_chunks(W.shape[0])
        ],
        W,
        config,
        context,
    )
    for k in codes:
        assert torch.equal(codes[k], again.tensors[k]), k


def test_blocks_that_miss_rows_are_refused():
    method = get_method("gptq")
    config = QuantConfig(bits=4, group_size=32)
    W, H = _problem()
    context = method.context()
    a, b = row_chunks(W.shape[0])[0]
    with pytest.raises(RuntimeError, match="row blocks"):
        method.rows.combine(
            [method.rows.solve(W[a:b], H, config, context, a, {})], W, config, context
        )
