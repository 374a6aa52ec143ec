"""Hessian accumulation and damping."""

from __future__ import annotations

import pytest
import torch

from latticequant.core.hessian import HessianAccumulator, dead_columns, with_damping


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_hessian_equals_batch_formula(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 50, 16, generator=g)
    acc = HessianAccumulator(16, dtype=dtype)
    for chunk in X.split(1):
        acc.add(chunk)
    ref = X.reshape(-1, 16).double()
    ref = ref.T @ ref / ref.shape[0]
    assert acc.n_tokens == 150 and acc.H.dtype == dtype
    torch.testing.assert_close(
        acc.H.double(),
        ref,
        rtol=1e-5 if dtype == torch.float32 else 1e-12,
        atol=1e-6 if dtype == torch.float32 else 1e-12,
    )


def test_mask_keeps_padding_out():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2, 10, 4, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    X_pad = X.clone()
    X_pad[1, 6:] = 1e6  # padding positions carry garbage
    acc = HessianAccumulator(4, dtype=torch.float64)
    acc.add(X_pad, mask=mask)
    kept = X[mask].double()
    torch.testing.assert_close(acc.H, kept.T @ kept / 16)
    assert acc.n_tokens == 16


def test_accumulator_errors():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no tokens"):
        _ = acc.H
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="mask"):
        acc.add(torch.randn(3, 4), mask=torch.ones(2, dtype=torch.bool))


def test_damping_is_raised_until_the_factor_succeeds():
    H = torch.zeros(3, 3, dtype=torch.float64)
    H[0, 0] = 1.0
    H[1, 1] = 1.0
    H[0, 1] = H[1, 0] = 1.0  # singular, and column 2 dead
    assert dead_columns(H).tolist() == [False, False, True]
    tried = []

    def factor(Hd):
        tried.append(Hd[0, 0].item())
        L, info = torch.linalg.cholesky_ex(Hd)
        return L if int(info) == 0 else None

    L, damp = with_damping(H, 0.0, factor)
    assert damp > 0 and len(tried) >= 2
    torch.testing.assert_close(L @ L.T, H + damp * (2 / 3) * torch.eye(3, dtype=H.dtype))


@pytest.mark.parametrize("d_in", [5, 400, 800, 1600])
def test_tiled_upper_sum_mirrors_to_the_full_gram_matrix(d_in):
    # 1, 1, 2 and 4 column tiles: only tiles on and above the diagonal are ever summed.
    g = torch.Generator().manual_seed(d_in)
    x = torch.randn(700, d_in, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(d_in, dtype=torch.float64)
    acc.add(x[:300])
    acc.add(x[300:])
    H = acc.H
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H, x.T @ x / 700, rtol=1e-12, atol=1e-12)
