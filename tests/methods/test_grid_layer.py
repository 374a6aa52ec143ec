"""The grid methods' layer wrapper: what it holds beside the solve, measured in a fresh process."""

from __future__ import annotations

from peak_memory import peak_copies


def test_gptq_layer_does_not_copy_the_hessian_again():
    """One GPTQ layer through the registered method (solve, RTN baseline, packing) on a
    4096-wide float32 Hessian raises the peak RSS by under 2.25 float64 copies of it: the
    factor, gathered from H, and what the libraries allocate around it (1.6 to 1.8 measured).
    A float64 copy of H beside the factor made it 2.7, and before that a copy held by the
    wrapper and a factorization for the RTN baseline's bound made it 4.7."""
    copies = peak_copies(
        4096,
        """
        from latticequant.core.config import QuantConfig
        from latticequant.methods import get_method
        W = torch.randn(16, n, generator=g)
        method, cfg = get_method("gptq"), QuantConfig(bits=4, group_size=128, order="act")
        method.quantize(W[:, :256], H[:256, :256], cfg)  # libraries' first-use buffers
        """,
        "method.quantize(W, H, cfg)",
    )
    assert copies < 2.25, f"the layer held {copies:.2f} float64 copies of H"
