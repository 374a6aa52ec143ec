"""The safeguarded secant search behind SSQR's and HPTQ's budgets, on step functions whose
landing band is known by construction."""

from __future__ import annotations

import math

import pytest

from latticequant.core import search


def test_meet_target_lands_on_a_step_function_with_few_evaluations():
    # bits of a Gaussian-like code as a step function of log2 scale: 1/64-bit steps
    def evaluate(x):
        return math.floor((4.7 - 1.03 * x) * 64) / 64, x

    found = search.meet_target(evaluate, 0.0, 3.125, 0.01, slope=-1.0)
    assert found.landed and 3.115 <= found.value <= 3.125
    assert found.evaluations <= 6
    # a brute-force scan agrees that the landing band is where the search stopped
    assert 3.115 <= evaluate(found.x)[0] <= 3.125


def test_meet_target_keeps_the_point_below_target_when_it_cannot_land():
    def evaluate(x):  # jumps over the band [2.9, 3.0]
        return (4.0 if x < 1.0 else 2.0), x

    found = search.meet_target(evaluate, 0.0, 3.0, 0.1, slope=-1.0, x_tol=1e-3)
    assert not found.landed and found.value == 2.0
    assert 1.0 <= found.x < 1.0 + 2e-3


def test_meet_target_out_of_reach_reports_the_limit():
    def evaluate(x):
        return max(1.0, 5.0 - x), x

    with pytest.raises(search.OutOfReach) as info:
        search.meet_target(evaluate, 0.0, 0.5, 0.01, slope=-1.0, x_max=10.0)
    assert info.value.point.x == 10.0 and info.value.point.value == 1.0
    with pytest.raises(ValueError, match="negative"):
        search.meet_target(evaluate, 0.0, 0.5, 0.01, slope=1.0)
