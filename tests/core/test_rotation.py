"""Randomised Hadamard rotations against dense matrices built another way."""

from __future__ import annotations

import pytest
import torch

from latticequant.core.rotation import (
    MAX_ODD_FACTOR,
    Rotation,
    block_hadamard_rotation,
    fwht,
    hadamard_rotation,
    rotate_problem,
    split_size,
    sylvester_hadamard,
)

SIZES = (1, 2, 3, 8, 12, 64, 96, 576, 1536, 2 * 63, 4096)


def doubling_hadamard(a: int) -> torch.Tensor:
    """Sylvester's construction by doubling, ``[[H, H], [H, -H]]`` (no bit tricks)."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < a:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def dense_rotation(rot: Rotation) -> torch.Tensor:
    """``diag(s) (H_a kron F) / sqrt(a)`` formed densely with torch.kron."""
    K = torch.kron(doubling_hadamard(rot.a), rot.factor) / rot.a**0.5
    return rot.signs[:, None] * K


@pytest.mark.parametrize("n", SIZES)
def test_rotation_is_orthogonal_and_matches_the_dense_matrix(n):
    rot = hadamard_rotation(n, seed=5)
    R = dense_rotation(rot)
    eye = torch.eye(n, dtype=torch.float64)
    assert (R @ R.T - eye).abs().max() < 1e-12 * max(1.0, n**0.5)
    assert (R.T @ R - eye).abs().max() < 1e-12 * max(1.0, n**0.5)
    x = torch.randn(7, n, dtype=torch.float64)
    assert torch.allclose(rot.apply(x), x @ R, atol=1e-12, rtol=0)
    assert torch.allclose(rot.apply_transpose(x), x @ R.T, atol=1e-12, rtol=0)
    assert torch.allclose(rot.apply_transpose(rot.apply(x)), x, atol=1e-12, rtol=0)
    assert (rot.a, rot.m) == split_size(n) and rot.a * rot.m == n


def test_every_supported_size_up_to_300_is_orthogonal():
    for n in range(1, 301):
        try:
            split_size(n)
        except ValueError:
            assert (n // (n & -n)) > MAX_ODD_FACTOR
            continue
        R = dense_rotation(hadamard_rotation(n, seed=n))
        assert (R @ R.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-13 * n, n


@pytest.mark.parametrize("n", (576, 1536))
def test_rotation_spreads_every_row(n):
    """Incoherence: no entry of R is far above 1/sqrt(n), so a spike is spread over all inputs."""
    R = dense_rotation(hadamard_rotation(n, seed=1))
    assert R.abs().max() * n**0.5 < 4.0
    spike = torch.zeros(1, n, dtype=torch.float64)
    spike[0, 3] = 1.0
    assert (spike @ R).abs().max() < 4.0 / n**0.5


def test_fwht_and_sylvester_match_the_doubling_construction():
    for a in (1, 2, 4, 32, 256):
        H = doubling_hadamard(a)
        assert torch.equal(sylvester_hadamard(a), H)
        x = torch.randn(3, a, 5, dtype=torch.float64)
        assert torch.allclose(fwht(x, a), torch.einsum("ij,bjm->bim", H, x), atol=1e-12)


def test_seeds_give_different_rotations_and_the_same_seed_the_same():
    a, b, c = (hadamard_rotation(576, s) for s in (0, 0, 1))
    assert torch.equal(a.signs, b.signs) and torch.equal(a.factor, b.factor)
    assert not torch.equal(a.signs, c.signs)


def test_rotate_problem_is_the_same_problem_in_the_rotated_basis():
    torch.manual_seed(0)
    n = 96
    X = torch.randn(300, n, dtype=torch.float64)
    H = X.T @ X / 300
    W = torch.randn(5, n, dtype=torch.float64)
    rot = hadamard_rotation(n, 2)
    R = dense_rotation(rot)
    W_rot, H_rot = rotate_problem(W, H, rot)
    assert torch.allclose(W_rot, W @ R, atol=1e-12)
    assert torch.allclose(H_rot, R.T @ H @ R, atol=1e-12)
    assert torch.equal(H_rot, H_rot.T)
    # any Q: the loss of Q R in the rotated problem is the loss of Q in the original
    Q = W + 0.1 * torch.randn_like(W)
    E, E_rot = W - Q, W_rot - Q @ R
    assert torch.allclose(((E @ H) * E).sum(), ((E_rot @ H_rot) * E_rot).sum(), rtol=1e-12)


@pytest.mark.parametrize("rows", (3, 7, 256))
def test_rotate_problem_in_tiles_from_a_float32_hessian(monkeypatch, rows):
    """Tiles of 3 or 7 rows that do not divide n = 80 (or one tile): the rotated Hessian of a
    float32 H is float64, exactly symmetric, and R^T H R of H's float64 values; H is untouched."""
    import latticequant.core.rotation as rotation

    monkeypatch.setattr(rotation, "ROTATE_ROWS", rows)
    torch.manual_seed(1)
    n = 80  # 16 x 5: a stored odd factor too
    X = torch.randn(200, n)
    H = X.T @ X / 200
    before = H.clone()
    rot = hadamard_rotation(n, 3)
    R = dense_rotation(rot)
    _, H_rot = rotate_problem(torch.randn(2, n, dtype=torch.float64), H, rot)
    assert H_rot.dtype == torch.float64 and torch.equal(H_rot, H_rot.T)
    assert torch.allclose(H_rot, R.T @ H.double() @ R, atol=1e-12)
    assert torch.equal(H, before)


@pytest.mark.parametrize("bad", (0, -8, 577, 2 * 65, True, 1.5))
def test_sizes_without_a_small_factorisation_are_refused(bad):
    with pytest.raises(ValueError) as exc:
        split_size(bad)
    assert "\n" not in str(exc.value)
    if isinstance(bad, int) and not isinstance(bad, bool) and bad > 0:
        assert f"above {MAX_ODD_FACTOR}" in str(exc.value) and "--skip" in str(exc.value)


def test_bad_seed_and_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="seed"):
        hadamard_rotation(64, -1)
    rot = hadamard_rotation(64, 0)
    with pytest.raises(ValueError, match="64"):
        rot.apply(torch.randn(2, 63))
    with pytest.raises(ValueError):
        Rotation(torch.ones(12), torch.eye(5, dtype=torch.float64))


def _random_orthogonal(m: int, seed: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))  # fmt: skip
    return Q.contiguous()  # torch.kron needs contiguous operands


@pytest.mark.parametrize("a, m", [(1, 1), (8, 3), (64, 9), (512, 3), (4, 12)])
def test_factor_major_layout_is_the_kronecker_product_the_other_way_round(a, m):
    """``diag(s) (F kron H_a) / sqrt(a)`` (compressed-tensors' layout) formed densely."""
    n = a * m
    signs = 1 - 2 * torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(a + m))
    rot = Rotation(signs.double(), _random_orthogonal(m, m), factor_major=True)
    R = signs.double()[:, None] * torch.kron(rot.factor, doubling_hadamard(a)) / a**0.5
    assert torch.allclose(rot.matrix(), R, atol=1e-12, rtol=0)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    assert torch.allclose(rot.apply(x), x @ R, atol=1e-12, rtol=0)
    assert torch.allclose(rot.apply_transpose(x), x @ R.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n, block", [(128, 128), (1536, 512), (576, 64), (96, 32), (6, 2)])
def test_block_hadamard_is_block_diagonal_sylvester(n, block):
    R = block_hadamard_rotation(n, block).matrix()
    blocks = [doubling_hadamard(block) / block**0.5] * (n // block)
    assert torch.allclose(R, torch.block_diag(*blocks), atol=1e-14, rtol=0)
    assert torch.allclose(R, R.T, atol=0, rtol=0) and torch.allclose(
        R @ R, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("n, block", [(96, 48), (96, 64), (0, 1), (8, 0), (8, True)])
def test_block_hadamard_refuses_blocks_that_do_not_tile(n, block):
    with pytest.raises(ValueError):
        block_hadamard_rotation(n, block)
