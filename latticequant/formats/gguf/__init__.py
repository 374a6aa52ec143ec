"""GGUF tensors on the exact grids of llama.cpp's quantization types.

``types`` describes each type's grid (:class:`GgufGrid`: the stored ``d``, ``dmin``, ``sc``,
``m``), its levels, its real scales and offsets and the nearest-level rounding a decoder uses;
``blocks`` packs codes and grid into the type's block layout byte for byte and back;
``reference`` is llama.cpp's own choice of the grid and codes (the ``quantize_row_*_ref``
quantizers); ``weighted_fit`` chooses Q2_0's scales from the Hessian-weighted error, which
llama.cpp's Q2_0 fit ignores; ``mix`` is llama.cpp's choice of a type per tensor for each file type.
"""

from latticequant.formats.gguf.blocks import get_scale_min_k4, pack, unpack, zero_code
from latticequant.formats.gguf.mix import (
    FileType,
    ModelShape,
    as_file_type,
    fallback,
    llama_tensor_shapes,
    tensor_types,
)
from latticequant.formats.gguf.reference import fit_grid, quantize_reference
from latticequant.formats.gguf.types import (
    KVALUES_IQ4NL,
    QK_K,
    TYPES,
    ColumnRounder,
    GGMLType,
    GgufGrid,
    TypeInfo,
    as_type,
    check_codes,
    codebook,
    dequantize,
    levels,
    nearest_codes,
    scales_offsets,
    type_info,
)
from latticequant.formats.gguf.weighted_fit import fit_q2_0

__all__ = [
    "FileType",
    "ModelShape",
    "as_file_type",
    "fallback",
    "llama_tensor_shapes",
    "tensor_types",
    "KVALUES_IQ4NL",
    "QK_K",
    "TYPES",
    "ColumnRounder",
    "GGMLType",
    "GgufGrid",
    "TypeInfo",
    "as_type",
    "check_codes",
    "dequantize",
    "fit_grid",
    "fit_q2_0",
    "get_scale_min_k4",
    "levels",
    "nearest_codes",
    "pack",
    "quantize_reference",
    "codebook",
    "scales_offsets",
    "type_info",
    "unpack",
    "zero_code",
]
