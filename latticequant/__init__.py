"""latticequant: post-training weight quantization as a closest-vector problem.

GPTQ, run back-to-front, is Babai's nearest plane algorithm on the lattice spanned by the
layer's input Hessian. The package is layered, each layer importing only those below it:
:mod:`latticequant.core` (pure functions on tensors), :mod:`latticequant.formats` (what a layer
stores and the modules that run it), :mod:`latticequant.methods` (the registry of methods),
:mod:`latticequant.pipeline` (models, text, the block loop, checkpoints), and the command line
on top. This module re-exports the core's public API and the run's: a :class:`RunSpec`,
:func:`prepare` (every check, once) and :func:`quantize_model` (which also writes the
checkpoint when the spec names an output).
"""

from latticequant.core import (
    HessianAccumulator,
    QuantConfig,
    QuantResult,
    act_order,
    babai_cvp,
    babai_quantize,
    cvp_enumerate,
    error_bound,
    gptq_quantize,
    kbest_quantize,
    ldl_diagonal,
    lll_reduce,
    min_pivot_order,
    nearest_plane,
    refine,
    rtn_quantize,
)
from latticequant.pipeline import (
    Calibration,
    CalibrationSpec,
    ExecutionSpec,
    OutputSpec,
    RunSpec,
    load_quantized,
    prepare,
    quantize_model,
    save_quantized,
)
from latticequant.version import __version__

__all__ = [
    "RunSpec",
    "CalibrationSpec",
    "OutputSpec",
    "ExecutionSpec",
    "Calibration",
    "prepare",
    "quantize_model",
    "save_quantized",
    "load_quantized",
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
    "__version__",
]
