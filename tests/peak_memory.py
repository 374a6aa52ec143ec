"""Peak resident memory of one call, measured in a fresh process (shared by the memory tests)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SPD_HESSIAN = """
g = torch.Generator().manual_seed(0)
X = torch.randn(n, 64, generator=g, dtype=DTYPE)
H = X @ X.T
H.diagonal().add_(1.0)
del X
"""


def peak_copies(n: int, setup: str, call: str, dtype: str = "float32") -> float:
    """How many float64 ``n x n`` matrices the peak RSS rises by while ``call`` runs.

    A fresh process runs ``setup`` with ``torch``, ``n`` and a positive definite ``H``
    (``n x n`` in ``dtype``) defined, then ``call``; what ``setup`` allocates, including
    libraries' first-use buffers it triggers, is not counted.
    """
    body = "\n".join(
        [
            "import resource, torch",
            f"n = {n}",
            f"DTYPE = torch.{dtype}",
            SPD_HESSIAN,
            textwrap.dedent(setup),
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024",
            textwrap.dedent(call),
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024",
            "print((peak - base) / (n * n * 8))",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", body], capture_output=True, text=True, check=True, timeout=300
    )
    return float(out.stdout.strip().splitlines()[-1])
