"""The lattice core: grids, Hessians, orders, lattice routines, GPTQ, Babai and RTN.

Layer 0 of the package: pure functions on tensors that import nothing else of latticequant.
"""

from latticequant.core.babai import babai_quantize
from latticequant.core.config import QuantConfig
from latticequant.core.gptq import gptq_quantize
from latticequant.core.hessian import HessianAccumulator
from latticequant.core.kbest import kbest_quantize
from latticequant.core.lattice import (
    babai_cvp,
    cvp_enumerate,
    error_bound,
    lll_reduce,
    nearest_plane,
)
from latticequant.core.order import act_order, ldl_diagonal, min_pivot_order
from latticequant.core.refine import refine
from latticequant.core.result import QuantResult
from latticequant.core.rtn import rtn_quantize

__all__ = [
    "QuantConfig",
    "QuantResult",
    "HessianAccumulator",
    "gptq_quantize",
    "babai_quantize",
    "rtn_quantize",
    "kbest_quantize",
    "refine",
    "nearest_plane",
    "babai_cvp",
    "lll_reduce",
    "cvp_enumerate",
    "error_bound",
    "act_order",
    "min_pivot_order",
    "ldl_diagonal",
]
