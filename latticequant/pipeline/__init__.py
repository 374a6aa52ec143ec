"""The pipeline: models, text and calibration, the block loop, run state, offload, checkpoints.

Layer 3 of the package: imports :mod:`latticequant.core`, :mod:`latticequant.formats` and
:mod:`latticequant.methods`, and is where every model and file operation lives.
"""

from latticequant.pipeline.checkpoint import (
    CheckpointError,
    QuantizedLayer,
    is_quantized_checkpoint,
    load_quantized,
    read_quant_log,
    save_quantized,
)
from latticequant.pipeline.overrides import Override, parse_override, resolve_config
from latticequant.pipeline.run import Calibration, QuantizeSummary, quantize_model
from latticequant.pipeline.spec import (
    CalibrationSpec,
    ExecutionSpec,
    LayerPlan,
    OutputSpec,
    Plan,
    RunSpec,
    plan_layers,
    prepare,
)
from latticequant.pipeline.state import OutputExistsError, ResumeMismatchError

__all__ = [
    "Calibration",
    "CalibrationSpec",
    "ExecutionSpec",
    "OutputSpec",
    "Plan",
    "RunSpec",
    "prepare",
    "CheckpointError",
    "LayerPlan",
    "OutputExistsError",
    "Override",
    "QuantizeSummary",
    "QuantizedLayer",
    "ResumeMismatchError",
    "is_quantized_checkpoint",
    "load_quantized",
    "parse_override",
    "plan_layers",
    "quantize_model",
    "read_quant_log",
    "resolve_config",
    "save_quantized",
]
