"""A safeguarded secant search for the scale that meets a storage budget.

SSQR's outlier rate and HPTQ's bits per weight are monotone step functions of one scale
parameter, each evaluation a whole decode; :func:`meet_target` finds a point inside the budget's
tolerance in few evaluations (docs/theory.md §7).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["meet_target", "SearchResult", "OutOfReach"]


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
    points = _Points(evaluate, target, tol, early_stop)
    landed = _bracket(points, x0, aim, transform, slope, x_min, x_max, max_iter)
    if landed is not None:
        return landed
    lo, hi = points.lo, points.hi
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
        point = points.run(x)
        if point.landed:
            return point
        lo, hi = points.lo, points.hi
        bisect = abs(hi.x - lo.x) > width / 2
    return points.hi


class _Points:
    """The evaluations of one search: the closest point above the target (``lo``) and the
    closest at most the target (``hi``)."""

    def __init__(self, evaluate, target: float, tol: float, early_stop: bool) -> None:
        self.evaluate, self.target, self.tol, self.early_stop = evaluate, target, tol, early_stop
        self.evals = 0
        self.lo: SearchResult | None = None  # value above the target
        self.hi: SearchResult | None = None  # value at most the target

    def run(self, x: float) -> SearchResult:
        self.evals += 1
        value, payload = self.evaluate(x)
        point = SearchResult(x, value, payload, self.evals)
        point.landed = self.early_stop and self.target - self.tol <= value <= self.target
        if value > self.target:
            if self.lo is None or x > self.lo.x:
                self.lo = point
        elif self.hi is None or x < self.hi.x:
            self.hi = point
        return point


def _bracket(
    points: _Points, x0, aim, transform, slope, x_min, x_max, max_iter
) -> SearchResult | None:
    """Secant steps (at most 4 units) from ``x0`` until the target is bracketed; returns a point
    that lands on the way, else None with ``points.lo`` and ``points.hi`` set."""
    x, prev = min(max(x0, x_min), x_max), None
    for _ in range(max_iter):
        point = points.run(x)
        if point.landed:
            return point
        if points.lo is not None and points.hi is not None:
            return None
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
    raise OutOfReach(point)
