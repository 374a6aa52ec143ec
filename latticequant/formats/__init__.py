"""Formats: what a quantized layer stores, how it is packed, and the modules that run it.

Layer 1 of the package: imports only :mod:`latticequant.core` (nothing here). ``packing`` holds
the bit streams, ``gptq``/``ssqr``/``hptq`` the tensor layouts, ``bits`` the effective-bits
count, ``quantize_config`` the ecosystem's config file, ``qlinear`` and ``kernels`` the modules
that run a layer, ``modules`` the registry the checkpoint loader builds them with.
"""

from latticequant.formats.bits import bits_breakdown, effective_bits, tensor_bits, total_bits
from latticequant.formats.gptq import (
    GPTQ_KEYS,
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
    HuffmanLinear,
    decode_hptq,
    dequantize_hptq,
    validate_hptq,
)
from latticequant.formats.modules import (
    ModuleFormat,
    build_module,
    format_names,
    get_format,
    register_format,
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
from latticequant.formats.qlinear import QuantLinear, SSQRLinear
from latticequant.formats.quantize_config import quantize_config_dict
from latticequant.formats.rotation import (
    ROTATION_KEYS,
    RotatedLinear,
    pack_rotation,
    unpack_rotation,
)
from latticequant.formats.ssqr import (
    SSQR_KEYS,
    csr_to_dense,
    dequantize_ssqr,
    pack_csr,
    pack_ssqr,
    validate_csr,
)

__all__ = [
    "CHECKPOINT_FORMATS",
    "GPTQ_KEYS",
    "HPTQ_KEYS",
    "SSQR_KEYS",
    "SUPPORTED_BITS",
    "FormatError",
    "HuffmanLinear",
    "HPTQ_CHUNK_KEYS",
    "ModuleFormat",
    "QuantLinear",
    "ROTATION_KEYS",
    "RotatedLinear",
    "pack_rotation",
    "unpack_rotation",
    "SSQRLinear",
    "bits_breakdown",
    "build_module",
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
