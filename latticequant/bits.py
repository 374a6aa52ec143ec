"""Effective bits per weight, counted from what a layer really stores (PAPER §7), and the
search that meets a storage budget (SSQR's outlier rate, HPTQ's bits per weight).

Every stored tensor counts at its storage size: packed codes (int32 words, padding included),
16-bit scales, packed zero points, ``g_idx``, outlier values, their column indices and row
pointers, Huffman bitstreams (whole bytes) and tables. Nothing is estimated: the numbers are
the sizes of the tensors written to the checkpoint.

Worked example (GPTQ, 4 bits, groups of 32, ``W`` 64 x 128): ``qweight`` is 16 x 64 int32
(4 bits per weight), ``scales`` 4 x 64 float16 (0.5), ``qzeros`` 4 x 8 int32 (0.125), ``g_idx``
128 int32 (0.5): 5.125 bits per weight in all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "tensor_bits",
    "bits_breakdown",
    "effective_bits",
    "total_bits",
    "KEY_KINDS",
    "meet_target",
    "SearchResult",
    "OutOfReach",
]

KEY_KINDS = {
    "qweight": "codes",
    "qzeros": "zeros",
    "scales": "scales",
    "g_idx": "g_idx",
    "outlier_val": "outlier values",
    "outlier_col": "outlier indices",
    "outlier_rowptr": "outlier row pointers",
    "hptq_stream": "huffman stream",
    "hptq_table": "huffman table",
    "hptq_scale": "scales",
    "hptq_shape": "shape",
}
"""What each stored key is, for reports that group the bits by kind."""


def tensor_bits(t: torch.Tensor) -> int:
    """Storage size of one tensor in bits (``numel * element_size * 8``)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"expected a tensor, got {type(t).__name__}")
    return t.numel() * t.element_size() * 8


def _checked_bits(
    tensors: Mapping[str, torch.Tensor], exact_bits: Mapping[str, int] | None
) -> dict[str, int]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("tensors must be a non-empty mapping of stored tensors")
    exact = dict(exact_bits or {})
    unknown = sorted(set(exact) - set(tensors))
    if unknown:
        raise ValueError(f"exact_bits names keys that are not stored: {unknown}")
    out = {}
    for key, t in tensors.items():
        stored = tensor_bits(t)
        if key in exact:
            n = exact[key]
            if not isinstance(n, int) or n < 0 or n > stored:
                raise ValueError(
                    f"exact_bits[{key!r}] = {n!r} must be an integer in [0, {stored}] "
                    f"(the tensor's storage size)"
                )
            out[key] = n
        else:
            out[key] = stored
    return out


def total_bits(
    tensors: Mapping[str, torch.Tensor], exact_bits: Mapping[str, int] | None = None
) -> int:
    """Bits stored for a layer; ``exact_bits`` may replace a key's size by its payload size."""
    return sum(_checked_bits(tensors, exact_bits).values())


def bits_breakdown(
    tensors: Mapping[str, torch.Tensor],
    n_weights: int,
    exact_bits: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Bits per weight of each stored key (keys without the module prefix)."""
    if isinstance(n_weights, bool) or not isinstance(n_weights, int) or n_weights <= 0:
        raise ValueError(f"n_weights must be a positive integer, got {n_weights!r}")
    return {k: b / n_weights for k, b in _checked_bits(tensors, exact_bits).items()}


def effective_bits(
    tensors: Mapping[str, torch.Tensor],
    n_weights: int,
    exact_bits: Mapping[str, int] | None = None,
) -> float:
    """Bits per weight of everything a layer stores.

    ``exact_bits`` maps a key to the number of bits it really needs when that is less than its
    storage (for example a Huffman stream's payload without its final byte's padding); by
    default every tensor counts in full, which is what the checkpoint holds.
    """
    return sum(bits_breakdown(tensors, n_weights, exact_bits).values())


@dataclass
class SearchResult:
    """A point of :func:`meet_target`: x, its value and payload, the evaluations so far."""

    x: float
    value: float
    payload: Any
    evaluations: int
    landed: bool = False


class OutOfReach(Exception):
    """The value cannot reach the target within the limits; ``point`` is the last one tried."""

    def __init__(self, point: SearchResult) -> None:
        super().__init__(f"target out of reach; value {point.value} at x = {point.x}")
        self.point = point


def meet_target(
    evaluate: Callable[[float], tuple[float, Any]],
    x0: float,
    target: float,
    tol: float,
    *,
    slope: float,
    x_min: float = -math.inf,
    x_max: float = math.inf,
    transform: Callable[[float], float] = float,
    max_iter: int = 40,
    x_tol: float = 1e-6,
    early_stop: bool = True,
) -> SearchResult:
    """Find ``x`` with ``evaluate(x)[0]`` in ``[target - tol, target]``; the value falls in x.

    The budgets of SSQR (outlier rate against the log of the scale factor) and HPTQ (bits per
    weight against the log of the scale) are monotone step functions of a costly decode, so this
    is a safeguarded secant search: ``transform`` makes the curve nearly straight (HPTQ's bits
    fall by about one per doubling of the scale; SSQR's log outlier rate is nearly linear) and
    ``slope`` is a first guess of ``d transform(value) / dx``. Secant steps (at most 4 units)
    bracket the target; inside the bracket, interpolation is followed by a bisection whenever
    it did not halve the bracket.

    Returns the first point that lands (with ``early_stop``), else the bracket's end that is not
    above the target, with ``landed=False``. Raises :class:`OutOfReach` when the value stays on
    the wrong side of the target up to ``x_min`` or ``x_max``.
    """
    if not slope < 0:
        raise ValueError("meet_target needs a negative first slope (a falling curve)")
    aim = transform(target - tol / 2)
    evals = 0
    lo: SearchResult | None = None  # value above the target
    hi: SearchResult | None = None  # value at most the target

    def run(x: float) -> SearchResult:
        nonlocal evals, lo, hi
        evals += 1
        value, payload = evaluate(x)
        point = SearchResult(x, value, payload, evals)
        point.landed = early_stop and target - tol <= value <= target
        if value > target:
            if lo is None or x > lo.x:
                lo = point
        elif hi is None or x < hi.x:
            hi = point
        return point

    x, prev = min(max(x0, x_min), x_max), None
    for _ in range(max_iter):  # bracket the target by secant steps
        point = run(x)
        if point.landed:
            return point
        if lo is not None and hi is not None:
            break
        if prev is not None and prev.x != point.x:
            secant = (transform(point.value) - transform(prev.value)) / (point.x - prev.x)
            if secant < 0:
                slope = secant
        prev = point
        step = (aim - transform(point.value)) / slope
        step = math.copysign(min(max(abs(step), 0.05), 4.0), step)
        nxt = min(max(x + step, x_min), x_max)
        if nxt == x:
            raise OutOfReach(point)
        x = nxt
    else:
        raise OutOfReach(point)
    bisect = False
    for _ in range(max_iter):  # shrink the bracket
        a, b = sorted((lo.x, hi.x))
        width = b - a
        if width < x_tol:
            break
        gl, gh = transform(lo.value), transform(hi.value)
        if bisect or gl == gh:
            x = (a + b) / 2
        else:
            x = lo.x + (aim - gl) * (hi.x - lo.x) / (gh - gl)
            x = min(max(x, a + 0.05 * width), b - 0.05 * width)
        if x in (a, b):
            break
        point = run(x)
        if point.landed:
            return point
        bisect = abs(hi.x - lo.x) > width / 2
    return hi
