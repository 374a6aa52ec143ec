"""Formats: what a quantized layer stores, how it is packed, and the modules that run it.

Layer 1 of the package: imports only :mod:`latticequant.core`. ``protocol`` defines a
:class:`Format` and its registry; each format is one module holding its layout, the module that
runs it and its registration (``gptq``: GPTQ v1 and v2, ``ssqr``, ``hptq``, ``rotation``: the
rotated variant of each, ``compressed_tensors``: the pack-quantized layout vLLM serves and its
rotated variant, whose online rotations ``ct_transform`` writes as its ``transform_config``);
``packing`` holds the bit streams, ``bits`` the effective-bits count, ``quantize_config`` the
ecosystem's config file, ``kernels`` the Triton kernels.
"""

from latticequant.formats.bits import bits_breakdown, effective_bits, tensor_bits, total_bits
from latticequant.formats.compressed_tensors import COMPRESSED_TENSORS, CompressedTensorsFormat
from latticequant.formats.gguf.format import GGUF, GgufFormat
from latticequant.formats.gptq import (
    GPTQ_KEYS,
    GPTQFormat,
    QuantLinear,
    dequantize_gptq,
    is_permuted,
    pack_gptq,
    pack_gptq_parts,
    unpack_gptq,
    validate_gptq,
)
from latticequant.formats.hptq import (
    HPTQ_CHUNK_KEYS,
    HPTQ_KEYS,
    HPTQFormat,
    HuffmanLinear,
    decode_hptq,
    dequantize_hptq,
    validate_hptq,
)
from latticequant.formats.packing import (
    CHECKPOINT_FORMATS,
    SUPPORTED_BITS,
    FormatError,
    pack_codes,
    pack_granularity,
    pack_zeros,
    packed_size,
    unpack_codes,
    unpack_zeros,
)
from latticequant.formats.protocol import (
    Format,
    LayerGrid,
    UnsupportedConfigError,
    format_names,
    formats_storing,
    get_format,
    kernel_description,
    key_kind,
    register_format,
)
from latticequant.formats.quantize_config import quantize_config_dict
from latticequant.formats.rotation import (
    ROTATED_FORMAT,
    ROTATION_KEYS,
    RotatedFormat,
    RotatedLinear,
    pack_rotation,
    unpack_rotation,
)
from latticequant.formats.ssqr import (
    SSQR_KEYS,
    SSQRFormat,
    SSQRLinear,
    csr_to_dense,
    dequantize_ssqr,
    pack_csr,
    pack_ssqr,
    validate_csr,
)

__all__ = [
    "GGUF",
    "GgufFormat",
    "LayerGrid",
    "CHECKPOINT_FORMATS",
    "COMPRESSED_TENSORS",
    "CompressedTensorsFormat",
    "GPTQ_KEYS",
    "HPTQ_KEYS",
    "SSQR_KEYS",
    "SUPPORTED_BITS",
    "FormatError",
    "HuffmanLinear",
    "HPTQ_CHUNK_KEYS",
    "Format",
    "GPTQFormat",
    "HPTQFormat",
    "SSQRFormat",
    "RotatedFormat",
    "ROTATED_FORMAT",
    "UnsupportedConfigError",
    "formats_storing",
    "kernel_description",
    "key_kind",
    "QuantLinear",
    "ROTATION_KEYS",
    "RotatedLinear",
    "pack_rotation",
    "unpack_rotation",
    "SSQRLinear",
    "bits_breakdown",
    "csr_to_dense",
    "decode_hptq",
    "dequantize_gptq",
    "dequantize_hptq",
    "dequantize_ssqr",
    "effective_bits",
    "format_names",
    "get_format",
    "is_permuted",
    "pack_codes",
    "pack_csr",
    "pack_granularity",
    "pack_gptq",
    "pack_gptq_parts",
    "pack_ssqr",
    "pack_zeros",
    "packed_size",
    "quantize_config_dict",
    "register_format",
    "tensor_bits",
    "total_bits",
    "unpack_codes",
    "unpack_gptq",
    "unpack_zeros",
    "validate_csr",
    "validate_gptq",
    "validate_hptq",
]
