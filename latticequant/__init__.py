"""latticequant: post-training weight quantization as a closest-vector problem.

GPTQ, run back-to-front, is Babai's nearest plane algorithm on the lattice spanned by the
layer's input Hessian. The core is pure functions on tensors; model walking, files and the
command line live at the edge.
"""

from latticequant.babai import babai_quantize
from latticequant.config import QuantConfig
from latticequant.gptq import gptq_quantize
from latticequant.hessian import HessianAccumulator
from latticequant.lattice import (
    babai_cvp,
    cvp_enumerate,
    error_bound,
    lll_reduce,
    nearest_plane,
)
from latticequant.order import act_order, ldl_diagonal, min_pivot_order
from latticequant.result import QuantResult
from latticequant.rtn import rtn_quantize

__all__ = [
    "QuantConfig",
    "QuantResult",
    "HessianAccumulator",
    "gptq_quantize",
    "babai_quantize",
    "rtn_quantize",
    "nearest_plane",
    "babai_cvp",
    "lll_reduce",
    "cvp_enumerate",
    "error_bound",
    "act_order",
    "min_pivot_order",
    "ldl_diagonal",
]
__version__ = "0.1.0"
