"""The float-outputs target and the cross Gram accumulator against float64 references."""

from __future__ import annotations

import pytest
import torch

from latticequant.core.hessian import CrossGramAccumulator
from latticequant.core.objective import output_target


def _drifted(n=500, d=10, o=4, drift=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Xq = X + drift * torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(o, d, generator=g, dtype=torch.float64)
    return X, Xq, W


def test_target_is_the_least_squares_solution_of_the_output_match():
    X, Xq, W = _drifted()
    n = X.shape[0]
    T, used = output_target(W, Xq.T @ Xq / n, X.T @ Xq / n, damp=0.0)
    ref = torch.linalg.lstsq(Xq, X @ W.T).solution.T  # argmin_T ||Xq T^T - X W^T||
    assert used == 0.0
    assert torch.allclose(T, ref, atol=1e-10, rtol=0)
    # and it beats W itself on the float outputs
    assert (Xq @ T.T - X @ W.T).pow(2).sum() < (Xq @ W.T - X @ W.T).pow(2).sum()


def test_no_drift_leaves_the_target_at_W_whatever_the_damping():
    X, _, W = _drifted()
    H = X.T @ X / X.shape[0]
    for damp in (0.0, 0.01, 1.0):
        T, _ = output_target(W, H, H.clone(), damp=damp)
        assert torch.allclose(T, W, atol=1e-12, rtol=0)


def test_damping_is_ridge_regression():
    X, Xq, W = _drifted(n=40, d=12)
    n = X.shape[0]
    H, C = Xq.T @ Xq / n, X.T @ Xq / n
    lam = 0.05 * torch.diagonal(H).mean()
    T, used = output_target(W, H, C, damp=0.05)
    ref = W + W @ (C - H) @ torch.linalg.inv(H + lam * torch.eye(12, dtype=torch.float64))
    assert used == 0.05 and torch.allclose(T, ref, atol=1e-10)


def test_dead_inputs_keep_their_weight_and_the_rest_is_least_squares():
    """A quantized input that never fires: its weight stays, and the other coordinates are the
    least-squares match without it (they may take over what the live float input did)."""
    X, Xq, W = _drifted()
    Xq[:, 3] = 0
    n = X.shape[0]
    T, _ = output_target(W, Xq.T @ Xq / n, X.T @ Xq / n, damp=0.0)
    keep = [j for j in range(10) if j != 3]
    ref = torch.linalg.lstsq(Xq[:, keep], X @ W.T).solution.T
    assert torch.equal(T[:, 3], W[:, 3])
    assert torch.allclose(T[:, keep], ref, atol=1e-10, rtol=0)


def test_float32_grams_in_column_blocks_match_the_float64_formula(monkeypatch):
    """Float32 Gram matrices (as the pipeline accumulates them), a dead input and drift blocks
    of 3 columns that do not divide d: the target equals the float64 formula on their exact
    float64 values."""
    import latticequant.core.objective as objective

    monkeypatch.setattr(objective, "DRIFT_COLUMNS", 3)
    X, Xq, W = _drifted(n=60, d=10)
    Xq[:, 6] = 0
    n = X.shape[0]
    H32, C32 = (Xq.T @ Xq / n).float(), (X.T @ Xq / n).float()
    T, used = output_target(W, H32, C32, damp=0.02)
    H, C = H32.double(), C32.double()
    H[6, 6] = 1.0
    lam = 0.02 * torch.diagonal(H).mean()
    drift = W @ (C - H)
    drift[:, 6] = 0
    ref = W + drift @ torch.linalg.inv(H + lam * torch.eye(10, dtype=torch.float64))
    assert used == 0.02 and T.dtype == torch.float64
    assert torch.allclose(T, ref, atol=1e-10, rtol=0)
    assert torch.equal(T[:, 6], W[:, 6])


def test_bad_shapes_and_values_are_refused():
    W = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="4x4"):
        output_target(W, torch.eye(5, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    C = torch.eye(4, dtype=torch.float64)
    C[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        output_target(W, torch.eye(4, dtype=torch.float64), C)


@pytest.mark.parametrize("batches", ([6], [1, 5], [2, 2, 2], [1] * 6))
def test_cross_gram_matches_float64_and_ignores_the_batching(batches):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 9, 7, generator=g)
    Y = X + 0.1 * torch.randn(6, 9, 7, generator=g)
    mask = torch.rand(6, 9, generator=g) > 0.3
    acc = CrossGramAccumulator(7, dtype=torch.float64)
    start = 0
    for b in batches:
        acc.add(X[start : start + b], Y[start : start + b], mask[start : start + b], start)
        start += b
    x, y = X[mask].double(), Y[mask].double()
    ref = x.T @ y / x.shape[0]
    assert acc.n_tokens == int(mask.sum())
    assert torch.allclose(acc.H, ref, atol=1e-12)
    assert not torch.allclose(acc.H, acc.H.T)  # a cross Gram is not symmetric
    with pytest.raises(ValueError):
        acc.add(X[:1], Y[:1, :, :6])
