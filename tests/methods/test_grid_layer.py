"""The grid methods' layer wrapper: what it holds beside the solve, measured in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_gptq_layer_does_not_copy_the_hessian_again():
    """One GPTQ layer through the registered method (solve, RTN baseline, packing) on a
    4096-wide float32 Hessian raises the peak RSS by under 2.25 float64 copies of it: the
    factor, gathered from H, and what the libraries allocate around it (1.6 to 1.8 measured).
    A float64 copy of H beside the factor made it 2.7, and before that a copy held by the
    wrapper and a factorization for the RTN baseline's bound made it 4.7."""
    script = textwrap.dedent(
        """
        import resource, torch
        from latticequant.core.config import QuantConfig
        from latticequant.methods import get_method
        n = 4096
        g = torch.Generator().manual_seed(0)
        X = torch.randn(n, 64, generator=g)
        H = X @ X.T
        H.diagonal().add_(1.0)
        del X
        W = torch.randn(16, n, generator=g)
        method, cfg = get_method("gptq"), QuantConfig(bits=4, group_size=128, order="act")
        method.quantize(W[:, :256], H[:256, :256], cfg)  # libraries' first-use buffers
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method.quantize(W, H, cfg)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print((peak - base) / (n * n * 8))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    copies = float(out.stdout.strip().splitlines()[-1])
    assert copies < 2.25, f"the layer held {copies:.2f} float64 copies of H"
