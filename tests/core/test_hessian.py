"""Hessian accumulation and damping."""

from __future__ import annotations

import pytest
import torch

from latticequant.core.hessian import (
    HessianAccumulator,
    dead_columns,
    gram_tiles,
    with_damped_diagonal,
)


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

    def factor(hd):
        tried.append(hd[0].item())
        Hd = H.clone()
        Hd.diagonal().copy_(hd)
        L, info = torch.linalg.cholesky_ex(Hd)
        return L if int(info) == 0 else None

    L, damp = with_damped_diagonal(torch.diagonal(H).clone(), 0.0, factor)
    assert damp > 0 and len(tried) >= 2
    torch.testing.assert_close(L @ L.T, H + damp * (2 / 3) * torch.eye(3, dtype=H.dtype))


@pytest.mark.parametrize("d_in", [5, 400, 800, 1600])
def test_tiled_upper_sum_mirrors_to_the_full_gram_matrix(d_in):
    # 1, 2, 4 and 4 column tiles: only tiles on and above the diagonal are ever summed.
    assert gram_tiles(d_in, "cpu") == {5: 1, 400: 2, 800: 4, 1600: 4}[d_in]
    g = torch.Generator().manual_seed(d_in)
    x = torch.randn(700, d_in, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(d_in, dtype=torch.float64)
    acc.add(x[:300])
    acc.add(x[300:])
    H = acc.H
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H, x.T @ x / 700, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_in", [576, 1536])
def test_cpu_tiles_sum_the_whole_gram_matrix(d_in, dtype):
    """The CPU's narrow tiles (4 from d = 576) cover the upper triangle once: every element
    equals the float64 product to the accuracy of the accumulator's dtype. (That the tiles
    also give the very bits of one ``x^T x`` is a property of the BLAS, measured on this
    project's machines and recorded in docs/pipeline.md, not asserted here.)"""
    g = torch.Generator().manual_seed(d_in)
    scale = 10.0 ** torch.randint(-3, 4, (1, d_in), generator=g).double()
    x = torch.randn(512, d_in, generator=g, dtype=torch.float64) * scale
    acc = HessianAccumulator(d_in, dtype=dtype)
    acc.add(x.to(dtype)[None])
    xd = x.to(dtype).double()
    reference = (xd.T @ xd).triu()
    assert gram_tiles(d_in, "cpu") == 4 and gram_tiles(d_in, "meta") == (1 if d_in < 768 else 4)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    err = (acc.sum.double().triu() - reference).abs()
    bound = tol * (xd.abs().T @ xd.abs()).triu()
    assert bool((err <= bound).all())


def _windows(n: int, seed: int) -> torch.Tensor:
    """Activations whose magnitudes differ by orders, so that any change in the order of the
    additions shows in the last bits."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-3, 4, (n, 1, 1), generator=g).float()
    return torch.randn(n, 7, 6, generator=g) * scale


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_hessian_is_the_same_float_for_any_split_of_the_windows(n):
    """Shares of the windows summed apart and combined give exactly the one-process sum."""
    X = _windows(n, n)
    whole = HessianAccumulator(6)
    whole.add(X)
    g = torch.Generator().manual_seed(100 + n)
    for _ in range(20):
        cuts = sorted(set(torch.randint(0, n + 1, (3,), generator=g).tolist()) | {0, n})
        parts = []
        for a, b in zip(cuts, cuts[1:]):
            acc = HessianAccumulator(6)
            for i in range(a, b):  # one window at a time: batching changes nothing either
                acc.add(X[i : i + 1], first_window=i)
            parts.append(acc.nodes())
        merged = HessianAccumulator.from_nodes(parts[::-1], 6, torch.float32)
        assert torch.equal(merged.sum, whole.sum) and merged.n_tokens == whole.n_tokens
    ref = X.reshape(-1, 6).double()
    torch.testing.assert_close(whole.H.double(), ref.T @ ref / ref.shape[0], rtol=1e-5, atol=1e-3)


def test_a_plain_running_sum_would_differ():
    """The data above do expose the order of the additions: summing the windows left to right
    gives other bits than the tree, so the test above can fail."""
    X = _windows(13, 13)
    tree = HessianAccumulator(6)
    tree.add(X)
    running = torch.zeros(6, 6)
    for i in range(13):  # the very same leaves, added in another order
        leaf = HessianAccumulator(6)
        leaf.add(X[i : i + 1])
        running += leaf.sum
    assert not torch.equal(tree.sum, running)
    torch.testing.assert_close(tree.sum, running, rtol=1e-5, atol=1e-2)


def test_windows_out_of_order_or_twice_are_refused():
    acc = HessianAccumulator(6)
    acc.add(_windows(2, 0), first_window=3)
    with pytest.raises(ValueError, match="arrives after"):
        acc.add(_windows(1, 1), first_window=4)
    other = HessianAccumulator(6)
    other.add(_windows(1, 2), first_window=4)
    with pytest.raises(ValueError, match="two parts"):
        HessianAccumulator.from_nodes([acc.nodes(), other.nodes()], 6, torch.float32)


@pytest.mark.parametrize("n_windows", [1, 3, 8])
def test_finish_gives_the_same_hessian_in_place(n_windows):
    """``finish`` equals ``H`` of a twin accumulator bit for bit and against float64, is
    built in the memory of the last pending sum, and closes the accumulator."""
    g = torch.Generator().manual_seed(n_windows)
    X = torch.randn(n_windows, 40, 1100, generator=g)  # 1100 wide: mirrored in two row blocks
    a, b = HessianAccumulator(1100), HessianAccumulator(1100)
    a.add(X)
    b.add(X)
    last = a.nodes()[-1].S.data_ptr()
    H = a.finish()
    assert H.data_ptr() == last
    assert torch.equal(H, b.H)
    X64 = X.reshape(-1, 1100).double()
    torch.testing.assert_close(H.double(), X64.T @ X64 / X64.shape[0], rtol=1e-5, atol=1e-5)
    assert a.H is H and a.finish() is H and a.n_tokens == 40 * n_windows
    with pytest.raises(ValueError, match="finished"):
        a.add(X[:1])
    with pytest.raises(ValueError, match="finished"):
        a.nodes()


def test_mirror_upper_in_place():
    from latticequant.core.hessian import mirror_upper_

    M = torch.randn(2500, 2500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = torch.triu(M) + torch.triu(M, 1).T
    ptr = M.data_ptr()
    out = mirror_upper_(M)
    assert out.data_ptr() == ptr and torch.equal(out, want)
