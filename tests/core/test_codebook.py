"""Decoding onto a codebook grid (GGUF's IQ4_NL: ``q = s (levels[z] - o)``, 16 non-uniform
levels) against references written here in float64: brute-force nearest levels for rounding,
the textbook unblocked GPTQ loop for error feedback."""

from __future__ import annotations

import pytest
import torch

from latticequant.core.babai import babai_quantize
from latticequant.core.config import QuantConfig
from latticequant.core.gptq import gptq_quantize
from latticequant.core.grid import nearest_level
from latticequant.core.kbest import kbest_quantize
from latticequant.core.rtn import rtn_quantize
from tests.core.core_reference import damped_hessian, direct_loss

#: llama.cpp's kvalues_iq4nl, typed in from ggml-common.h (not imported from the package).
LEVELS = torch.tensor(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
    dtype=torch.float64,
)


def _problem(d_out=12, d_in=64, g=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(256, d_in, generator=gen, dtype=torch.float64)
    X = X @ (
        torch.eye(d_in, dtype=torch.float64)
        + 0.4 * torch.randn(d_in, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
    )
    H = X.T @ X / X.shape[0]
    W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    # IQ4_NL's grid: one scale per group of 32, no offset, levels spanning the group's weights
    S = W.reshape(d_out, d_in // g, g).abs().amax(dim=2) / 120
    Z = torch.zeros_like(S)
    return W, H, S, Z, QuantConfig(bits=4, group_size=g, block_size=16)


def _brute_nearest(u: torch.Tensor) -> torch.Tensor:
    return (u[..., None] - LEVELS).abs().argmin(dim=-1)


def _values(codes, S, g):
    return S.repeat_interleave(g, dim=1) * LEVELS[codes.long()]


def test_nearest_level_is_the_brute_force_argmin():
    u = torch.linspace(-140, 130, 5001, dtype=torch.float64)
    code, value = nearest_level(u, LEVELS)
    ref = _brute_nearest(u)
    # ties (a midpoint exactly) may go either way; both are nearest
    assert (
        (code.long() == ref) | ((u - LEVELS[code.long()]).abs() == (u - LEVELS[ref]).abs())
    ).all()
    assert torch.equal(value, LEVELS[code.long()])


def test_rtn_rounds_each_weight_to_its_nearest_level():
    W, H, S, Z, cfg = _problem()
    r = rtn_quantize(W, H, cfg, scales=S, zeros=Z, integer_zeros=False, levels=LEVELS)
    ref = _brute_nearest(W / S.repeat_interleave(32, dim=1))
    assert torch.equal(r.codes, ref)
    assert torch.allclose(r.Q, _values(ref, S, 32), rtol=0, atol=1e-12)


def _textbook_gptq(W, H, S, g, damp):
    """Unblocked GPTQ in natural order: round column j to its nearest level, spread the error
    over the later columns through the Cholesky factor of the damped inverse Hessian."""
    Hd = damped_hessian(H, damp)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    W = W.clone()
    codes = torch.empty_like(W, dtype=torch.long)
    for j in range(W.shape[1]):
        s = S[:, j // g]
        codes[:, j] = _brute_nearest(W[:, j] / s)
        err = (W[:, j] - s * LEVELS[codes[:, j]]) / U[j, j]
        W[:, j + 1 :] -= err[:, None] * U[j, j + 1 :][None, :]
    return codes


def test_gptq_on_a_codebook_is_the_textbook_loop():
    W, H, S, Z, cfg = _problem()
    r = gptq_quantize(W, H, cfg, scales=S, zeros=Z, integer_zeros=False, levels=LEVELS)
    ref = _textbook_gptq(W, H, S, 32, cfg.damp)
    assert (r.codes == ref).float().mean() > 0.99  # float64 summation order may flip a tie
    assert torch.allclose(r.Q, _values(r.codes, S, 32), rtol=0, atol=1e-12)
    loss = direct_loss(W, H, r.Q)
    assert torch.allclose(r.loss, loss, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("decoder", ["babai", "kbest"])
def test_lattice_decoders_on_a_codebook_beat_rounding(decoder):
    W, H, S, Z, cfg = _problem(seed=3)
    grid = {"scales": S, "zeros": Z, "integer_zeros": False, "levels": LEVELS}
    rtn = rtn_quantize(W, H, cfg, **grid)
    babai = babai_quantize(W, H, cfg, **grid)
    r = babai if decoder == "babai" else kbest_quantize(W, H, cfg, beam=4, **grid)
    assert r.codes.min() >= 0 and r.codes.max() <= 15
    assert torch.allclose(r.Q, _values(r.codes, S, 32), rtol=0, atol=1e-12)
    loss = direct_loss(W, H, r.Q)
    assert torch.allclose(r.loss, loss, rtol=1e-6, atol=1e-9)
    assert loss.sum() < direct_loss(W, H, rtn.Q).sum()
    if decoder == "kbest":  # its candidates include Babai's point
        assert (loss <= direct_loss(W, H, babai.Q) * (1 + 1e-9)).all()


def test_codebook_needs_a_static_grid():
    W, H, S, Z, cfg = _problem()
    with pytest.raises(ValueError, match="static grid"):
        gptq_quantize(W, H, cfg.replace(static_groups=False), levels=LEVELS)
