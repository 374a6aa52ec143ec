"""Checkpoint folders: ``latticequant.checkpoint.load_quantized`` and friends, at the path users
know; defined in :mod:`latticequant.pipeline.checkpoint`."""

from latticequant.pipeline.checkpoint import (
    LOG_FILE,
    CheckpointError,
    QuantizedLayer,
    check_file_config,
    is_quantized_checkpoint,
    load_quantized,
    read_quant_log,
    save_quantized,
)
from latticequant.pipeline.files import WEIGHTS_FILE

__all__ = [
    "CheckpointError",
    "QuantizedLayer",
    "save_quantized",
    "load_quantized",
    "check_file_config",
    "is_quantized_checkpoint",
    "read_quant_log",
    "WEIGHTS_FILE",
    "LOG_FILE",
]
