"""SSQR: exact dequantization, outlier-rate search, the Babai bound, an independent reference."""

from __future__ import annotations

import pytest
import torch

import latticequant as lq
from latticequant import formats
from latticequant.core.grid import fit_grid
from latticequant.methods import get_method, ssqr


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread avoids thread-pool waits on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _problem(d_out=32, d_in=128, seed=0, dtype=torch.float32, planted=8):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.02
    idx = torch.randint(0, d_out * d_in, (planted,), generator=g)
    W.view(-1)[idx] *= 12  # heavy-tailed weights, as in LLMs
    A = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * 0.2 + torch.eye(
        d_in, dtype=torch.float64
    )
    X = torch.randn(4 * d_in, d_in, generator=g, dtype=torch.float64) @ A
    H = X.T @ X / X.shape[0]
    return W.to(dtype), H.to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_checkpoint_dequantizes_to_exactly_what_the_quantizer_produced(bits):
    W, H = _problem(seed=bits)
    cfg = ssqr.SSQRConfig(bits=bits, group_size=32, outlier_rate=0.02, tol=0.005)
    r = ssqr.ssqr_quantize(W, H, cfg)
    tensors = ssqr.ssqr_tensors(r)
    assert set(tensors) == set(formats.SSQR_KEYS)
    assert tensors["outlier_val"].dtype == torch.float16
    assert tensors["outlier_col"].dtype == torch.int16
    assert torch.equal(tensors["g_idx"].long(), torch.arange(W.shape[1]) // 32)
    W_hat = formats.dequantize_ssqr(tensors, bits)
    assert torch.equal(W_hat, r.Q)
    # the pieces: dense codes on the grid, the zero point at outliers, values are fp16(Q)
    maxq, zero = (1 << bits) - 1, 1 << (bits - 1)
    assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= maxq
    assert bool((r.codes[r.outliers] == zero).all())
    assert int(tensors["outlier_rowptr"][-1]) == r.n_outliers > 0
    dense = r.scales.float()[:, r.g_idx] * (r.codes.float() - zero)
    assert torch.equal(torch.where(r.outliers, r.Q, dense), r.Q)
    assert torch.equal(r.Q[r.outliers], r.Q[r.outliers].half().float())


@pytest.mark.parametrize("rate", [0.01, 0.02, 0.05])
def test_outlier_rate_search_lands_within_tolerance(rate):
    W, H = _problem(d_out=64, d_in=128, seed=7)
    cfg = ssqr.SSQRConfig(bits=3, group_size=64, outlier_rate=rate, tol=0.002)
    r = ssqr.ssqr_quantize(W, H, cfg)
    assert rate - 0.002 <= r.outlier_rate <= rate
    assert r.iterations <= 64
    # the search variable is real: the scales are the base MSE grid times the factor (fp16)
    base, _ = fit_grid(W, cfg.grid_config())
    assert torch.equal(r.scales, (base * r.factor).half())


@pytest.mark.parametrize("seed", range(3))
def test_babai_bound_holds_nothing_clipped(seed):
    W, H = _problem(seed=10 + seed)
    for rate in (0.0, 0.01, 0.05):
        cfg = ssqr.SSQRConfig(bits=2, group_size=32, outlier_rate=rate, tol=rate / 2)
        r = ssqr.ssqr_quantize(W, H, cfg)
        assert r.clipped == 0
        assert bool((r.loss <= r.bound).all()), (r.loss / r.bound).max()
        # the loss is the proxy loss of the stored weight, computed independently in float64
        E = (W - r.Q).double()
        assert torch.allclose(((E @ H.double()) * E).sum(1), r.loss.double(), rtol=1e-4)


def _reference_ssqr(W, H, P, scales, g_idx, bits):
    """Unblocked OBS with the outlier rule: explicit inverse of the remaining Hessian per step."""
    W = W.clone()
    d_out, d_in = W.shape
    maxq, zero = (1 << bits) - 1, 1 << (bits - 1)
    codes = torch.zeros_like(W)
    out = torch.zeros(d_out, d_in, dtype=torch.bool)
    Q = torch.zeros_like(W)
    remaining = P.tolist()
    for j in P.tolist():
        Hinv = torch.linalg.inv(H[remaining][:, remaining])
        k = remaining.index(j)
        s = scales[:, g_idx[j]]
        t = W[:, j]
        c = torch.round(t / s + zero)
        o = (c < 0) | (c > maxq)
        c = torch.where(o, torch.full_like(c, zero), c)
        q = torch.where(o, t.half().double(), s * (c - zero))
        codes[:, j], out[:, j], Q[:, j] = c, o, q
        e = t - q
        # dw_F = -e_j [H_F^-1]_{F,j} / [H_F^-1]_{jj}
        W[:, remaining] -= e[:, None] * Hinv[:, k][None, :] / Hinv[k, k]
        remaining.remove(j)
    return codes, out, Q


def test_decode_matches_an_independent_reference():
    W, H = _problem(d_out=8, d_in=40, seed=3, dtype=torch.float64, planted=4)
    cfg = ssqr.SSQRConfig(bits=3, group_size=16, order="act", damp=0.01, block_size=8)
    prob = ssqr._problem(W, H, cfg)
    scales = (prob.base_scales * 0.8).half()  # narrow grid: plenty of outliers
    codes, outliers, Q = ssqr.ssqr_decode(W, prob.P, prob.U, scales, prob.g_idx, 3, 8)
    Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(40, dtype=torch.float64)
    ref_codes, ref_out, ref_Q = _reference_ssqr(
        W, Hd, lq.act_order(Hd), scales.double(), prob.g_idx, 3
    )
    assert int(ref_out.sum()) > 5
    assert torch.equal(outliers, ref_out)
    assert torch.equal(codes.double(), ref_codes)
    assert torch.allclose(Q, ref_Q, rtol=0, atol=1e-12)


def test_without_outliers_it_is_unclipped_gptq():
    W, H = _problem(d_out=16, d_in=64, seed=5, planted=0)
    cfg = ssqr.SSQRConfig(bits=4, group_size=32)
    prob = ssqr._problem(W, H, cfg)
    scales = (prob.base_scales * 3).half()  # wide grid: no outliers
    codes, outliers, Q = ssqr.ssqr_decode(W, prob.P, prob.U, scales, prob.g_idx, 4, 128)
    assert not outliers.any()
    zeros = torch.full(scales.shape, 8.0)
    ref = lq.gptq_quantize(
        W, H, cfg.grid_config().replace(order=prob.P), scales=scales.float(), zeros=zeros
    )
    assert ref.overflow == 0
    assert torch.equal(codes, ref.codes)
    assert torch.equal(Q, ref.Q)


def test_registered_layer_function_and_bits():
    W, H = _problem(d_out=32, d_in=128, seed=2)
    method = get_method("ssqr")
    assert method.config_cls is ssqr.SSQRConfig and method.formats == ("ssqr",)
    cfg = ssqr.SSQRConfig(bits=3, group_size=64, outlier_rate=0.02, tol=0.005)
    layer = method.quantize(W, H, cfg)
    for key in ("loss", "bound", "clipped", "outliers", "bits_per_weight", "scale_factor"):
        assert key in layer.stats
    nnz = layer.stats["outliers"]
    assert nnz == int(layer.tensors["outlier_rowptr"][-1])
    # by hand: 3-bit codes, fp16 scales per 64-group, 3-bit zeros packed per group, int32 g_idx,
    # int32 row pointers, int16 columns and fp16 values per outlier
    n = 32 * 128
    expected = 3 * n + 16 * 2 * 32 + 2 * (32 * 3) + 32 * 128 + 32 * 33 + nnz * (16 + 16)
    assert layer.stats["bits_per_weight"] == expected / n
    assert layer.stats["loss"] <= layer.stats["bound"]
    assert torch.equal(formats.dequantize_ssqr(layer.tensors, 3), layer.Q)


def test_checkpoint_module_reproduces_the_weight():
    W, H = _problem(d_out=32, d_in=64, seed=4)
    r = ssqr.ssqr_quantize(W, H, ssqr.SSQRConfig(bits=4, group_size=32, outlier_rate=0.03))
    module = formats.get_format("ssqr").module(ssqr.ssqr_tensors(r), {"bits": 4, "in_features": 64})
    assert torch.equal(module.dequantize_weight(), r.Q)
    x = torch.randn(3, 64)
    assert torch.allclose(module(x), x @ r.Q.T, rtol=1e-5, atol=1e-6)


def test_zero_outlier_target_gives_no_outliers():
    W, H = _problem(d_out=16, d_in=64, seed=9)
    r = ssqr.ssqr_quantize(W, H, ssqr.SSQRConfig(bits=3, group_size=32, outlier_rate=0.0, tol=0))
    assert r.n_outliers == 0
    # and the factor is tight: a grid 1% narrower has outliers
    prob = ssqr._problem(W, H, ssqr.SSQRConfig(bits=3, group_size=32))
    narrower = (prob.base_scales * r.factor * 0.99).half()
    _, outliers, _ = ssqr.ssqr_decode(W, prob.P, prob.U, narrower, prob.g_idx, 3, 128)
    assert outliers.any()


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="bits"):
        ssqr.SSQRConfig(bits=5)
    with pytest.raises(ValueError, match="outlier_rate"):
        ssqr.SSQRConfig(outlier_rate=0.7)
    with pytest.raises(ValueError, match="tol"):
        ssqr.SSQRConfig(outlier_rate=0.01, tol=0.05)
    with pytest.raises(ValueError, match="group_size"):
        ssqr.SSQRConfig(group_size=0)
    with pytest.raises(ValueError, match="order"):
        ssqr.SSQRConfig(order="sideways")
    W, H = _problem(d_out=8, d_in=16)
    with pytest.raises(ValueError, match="SSQRConfig"):
        ssqr.ssqr_quantize(W, H, lq.QuantConfig())
    with pytest.raises(ValueError, match="d_in"):
        ssqr.ssqr_quantize(W, H[:8, :8], ssqr.SSQRConfig(group_size=8))


def test_checkpoint_round_trip_through_the_pipeline(tmp_path, calib_ids):
    from runs import run_quantize
    from tiny import make_char_tokenizer, make_tiny_llama

    from latticequant.checkpoint import load_quantized

    model = make_tiny_llama()
    cfg = ssqr.SSQRConfig(bits=3, group_size=32, outlier_rate=0.02, tol=0.01)
    out = tmp_path / "ckpt"
    stats = run_quantize(model, make_char_tokenizer(), calib_ids, "ssqr", cfg, out, progress=False)
    assert all(0.01 <= s["outlier_rate"] <= 0.02 for s in stats)
    assert all(s["clipped"] == 0 and s["loss"] <= s["bound"] for s in stats)
    loaded = load_quantized(out)
    name = stats[0]["name"]
    assert torch.equal(
        loaded.get_submodule(name).dequantize_weight(), model.get_submodule(name).weight
    )
    ref = model(calib_ids[:2]).logits
    assert torch.allclose(loaded(calib_ids[:2]).logits, ref, atol=1e-4, rtol=1e-4)
