"""In-place triangular factors against torch's out-of-place float64 results, and the memory
they save measured in a fresh process."""

from __future__ import annotations

import pytest
import torch
from peak_memory import peak_copies

from latticequant.core.triangular import (
    all_finite,
    cholesky_lower_,
    invert_lower_,
    permuted,
    reverse_,
)


def spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n + 5, generator=g, dtype=torch.float64)
    return X @ X.T / n + 0.05 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 7, 255, 256, 257, 600])
def test_cholesky_in_place_equals_torch(n):
    A = spd(n)
    L = A.clone()
    ptr = L.data_ptr()
    assert cholesky_lower_(L)
    assert L.data_ptr() == ptr
    torch.testing.assert_close(L, torch.linalg.cholesky(A), rtol=0, atol=1e-12)
    assert (L.triu(1) == 0).all()


def test_cholesky_in_place_refuses_indefinite():
    A = spd(40)
    A[3, 3] = -1.0
    assert not cholesky_lower_(A.clone())
    with pytest.raises(ValueError, match="contiguous square"):
        cholesky_lower_(spd(6)[:, :5])


@pytest.mark.parametrize("n", [1, 3, 64, 255, 256, 257, 700])
@pytest.mark.parametrize("block", [1, 64, 256])
def test_triangular_inverse_in_place(n, block):
    L = torch.linalg.cholesky(spd(n, seed=n))
    ref = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False)
    out = invert_lower_(L.clone(), block=block)
    assert (out.triu(1) == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    I = out @ L
    torch.testing.assert_close(I, torch.eye(n, dtype=L.dtype), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (5, 5), (33, 17)])
@pytest.mark.parametrize("chunk", [1, 4, 1 << 20])
def test_reverse_in_place_is_flip(shape, chunk):
    M = torch.arange(shape[0] * shape[1], dtype=torch.float64).reshape(shape)
    assert torch.equal(reverse_(M.clone(), chunk=chunk), M.flip(0, 1))


def test_permuted_and_all_finite():
    A = spd(30)
    p = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(permuted(A, p), A[p][:, p])
    assert all_finite(A, rows=7)
    A[29, 0] = float("nan")
    assert not all_finite(A, rows=7)


def test_gptq_factor_holds_one_extra_matrix():
    """GPTQ's factor on a 4096-wide Hessian (134 MB per float64 copy) raises the peak RSS of a
    fresh process by less than two copies (1.7 measured); the out-of-place route needed five."""
    copies = peak_copies(
        4096,
        """
        from latticequant.core.config import QuantConfig
        from latticequant.core.gptq import gptq_factor
        torch.linalg.cholesky(torch.eye(8, dtype=torch.float64))  # load LAPACK first
        """,
        'gptq_factor(H, QuantConfig(bits=4, order="act"))',
        dtype="float64",
    )
    assert copies < 2.0, f"the factor held {copies:.2f} copies of H"


@pytest.mark.parametrize("n", [5, 255, 256, 257, 700])
def test_permuted_with_dtype_and_diagonal(n):
    """The blocked gather from a float32 H into float64, with a diagonal of its own, against
    two-step indexing of the full float64 copy (row blocks of 256 cross at n = 257, 700)."""
    H32 = spd(n).float()
    p = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    h = torch.rand(n, dtype=torch.float64) + 1
    ref = H32.double()
    ref.diagonal().copy_(h)
    out = permuted(H32, p, diagonal=h, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(out, ref[p][:, p])
    assert torch.equal(H32.diagonal(), spd(n).float().diagonal())  # H itself untouched


@pytest.mark.parametrize("order", ["act", "min-pivot", "natural"])
@pytest.mark.parametrize("factor", ["gptq", "babai"])
def test_factor_through_a_diagonal_equals_the_float64_copy(order, factor):
    """A factor read from a float32 H with a float64 diagonal (dead column set to 1) is, bit for
    bit, the factor of the float64 copy carrying that diagonal, the route that held both."""
    from latticequant.core.babai import babai_factor
    from latticequant.core.config import QuantConfig
    from latticequant.core.gptq import gptq_factor
    from latticequant.core.hessian import prepare_diagonal

    n = 40
    H = spd(n, seed=3).float()
    H[7, :] = 0
    H[:, 7] = 0  # a dead input
    W = torch.randn(4, n, generator=torch.Generator().manual_seed(4))
    Wd, h = prepare_diagonal(W, H)
    assert h[7] == 1 and torch.equal(Wd[:, 7], torch.zeros(4)) and W[:, 7].abs().sum() > 0
    H64 = H.double()
    H64[7, 7] = 1.0
    f = {"gptq": gptq_factor, "babai": babai_factor}[factor]
    cfg = QuantConfig(bits=4, order=order)
    (P, U), damp = f(H, cfg, h)
    (P_ref, U_ref), damp_ref = f(H64, cfg)
    assert torch.equal(P, P_ref) and damp == damp_ref
    assert torch.equal(U, U_ref)
    Hd = H64 + damp * H64.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    HP = Hd[P][:, P]
    want = torch.linalg.inv(HP) if factor == "gptq" else HP  # U^T U, torch's dense route
    torch.testing.assert_close(U.T @ U, want, rtol=1e-9, atol=1e-9)


class ThreadTeam:
    """Ranks as threads of one process, exchanging through shared slots (tests only)."""

    def __init__(self, rank: int, size: int, shared: dict) -> None:
        self.rank, self.size, self.shared = rank, size, shared

    def broadcast(self, obj, kind: str, src: int = 0):
        if self.rank == src:
            self.shared["slots"][src] = obj
        self.shared["barrier"].wait()
        value = self.shared["slots"][src]
        self.shared["barrier"].wait()
        return value

    def all_gather(self, obj, kind: str) -> list:
        self.shared["slots"][self.rank] = obj
        self.shared["barrier"].wait()
        values = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return values


def _on_team(size: int, work):
    import threading

    shared = {"barrier": threading.Barrier(size), "slots": [None] * size}
    out = [None] * size

    def run(rank):
        out[rank] = work(ThreadTeam(rank, size, shared))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("n", [70, 200])
def test_a_team_factors_and_inverts_to_one_process_bits(n, size):
    """Panels shared out over 2 or 3 ranks (uneven: 3 and 7 panels of 32 columns): every rank
    ends with one process's factor and inverse, bit for bit."""
    A = spd(n, seed=n)
    one = A.clone()
    assert cholesky_lower_(one)
    inv = invert_lower_(one.clone(), block=32)

    def work(team):
        L = A.clone()
        ok = cholesky_lower_(L, team)
        return ok, L, invert_lower_(L.clone(), block=32, team=team)

    for ok, L, Li in _on_team(size, work):
        assert ok and torch.equal(L, one) and torch.equal(Li, inv)


def test_a_team_refuses_an_indefinite_matrix_together():
    A = spd(100)
    A[70, 70] = -1.0  # in the third panel

    def work(team):
        return cholesky_lower_(A.clone(), team)

    assert _on_team(3, work) == [False, False, False]
