"""Module formats: how the checkpoint loader turns one layer's stored tensors into a module.

Each format names the keys it stores and a builder; ``gptq`` and ``ssqr`` build
:class:`~latticequant.formats.qlinear.QuantLinear` / ``SSQRLinear``, ``hptq`` builds
:class:`~latticequant.formats.hptq.HuffmanLinear`. A new format registers itself with
:func:`register_format`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from latticequant.formats.gptq import GPTQ_KEYS
from latticequant.formats.hptq import HPTQ_CHUNK_KEYS, HPTQ_KEYS, build_hptq_module
from latticequant.formats.packing import FormatError, check_bits, check_checkpoint_format
from latticequant.formats.qlinear import QuantLinear, SSQRLinear
from latticequant.formats.ssqr import SSQR_KEYS

__all__ = ["ModuleFormat", "register_format", "get_format", "format_names", "build_module"]


Builder = Callable[[Mapping[str, torch.Tensor], Mapping, "torch.Tensor | None"], nn.Module]


@dataclass(frozen=True)
class ModuleFormat:
    """How the loader turns one layer's stored tensors into a module."""

    name: str
    keys: tuple[str, ...]
    build: Builder
    optional_keys: tuple[str, ...] = ()  # read when present (for example an added index)


_FORMATS: dict[str, ModuleFormat] = {}


def register_format(fmt: ModuleFormat) -> None:
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt


def get_format(name: str) -> ModuleFormat:
    """The registered module format ``name``."""
    if name not in _FORMATS:
        raise FormatError(f"unknown module format {name!r}; known: {sorted(_FORMATS)}")
    return _FORMATS[name]


def format_names() -> tuple[str, ...]:
    return tuple(sorted(_FORMATS))


def _meta_bits_format(meta: Mapping) -> tuple[int, str]:
    try:
        bits = int(meta["bits"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"module meta must give an integer 'bits', got {meta!r}") from None
    check_bits(bits)
    fmt = str(meta.get("checkpoint_format", "gptq"))
    check_checkpoint_format(fmt)
    return bits, fmt


def _check_meta_dims(meta: Mapping, d_in: int, d_out: int) -> None:
    for key, have in (("in_features", d_in), ("out_features", d_out)):
        if key in meta and int(meta[key]) != have:
            raise FormatError(f"stored tensors give {key}={have}, expected {int(meta[key])}")


def _module_options(meta: Mapping) -> dict:
    return {
        "backend": str(meta.get("backend", "auto")),
        "cache_weight": meta.get("cache_weight"),
    }


def _build_gptq(tensors, meta, bias=None) -> nn.Module:
    bits, fmt = _meta_bits_format(meta)
    module = QuantLinear.from_tensors(
        tensors, bits, checkpoint_format=fmt, bias=bias, **_module_options(meta)
    )
    _check_meta_dims(meta, module.in_features, module.out_features)
    return module


def _build_ssqr(tensors, meta, bias=None) -> nn.Module:
    bits, fmt = _meta_bits_format(meta)
    module = SSQRLinear.from_tensors(
        tensors, bits, checkpoint_format=fmt, bias=bias, **_module_options(meta)
    )
    _check_meta_dims(meta, module.in_features, module.out_features)
    return module


register_format(ModuleFormat("gptq", GPTQ_KEYS, _build_gptq))
register_format(ModuleFormat("ssqr", SSQR_KEYS, _build_ssqr))
register_format(ModuleFormat("hptq", HPTQ_KEYS, build_hptq_module, HPTQ_CHUNK_KEYS))


def build_module(
    format_name: str,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping,
    bias: torch.Tensor | None = None,
) -> nn.Module:
    """Build the inference module of one layer from its stored tensors (keys without prefix).

    ``meta`` holds at least ``bits``; optionally ``checkpoint_format`` (default ``"gptq"``),
    ``in_features``/``out_features`` (checked against the tensors), ``backend``
    ("auto" | "torch" | "triton") and ``cache_weight`` (see ``QuantLinear``).
    """
    fmt = get_format(format_name)
    missing = [k for k in fmt.keys if k not in tensors]
    if missing:
        raise FormatError(f"format {format_name!r}: missing tensor(s) {missing}")
    return fmt.build(tensors, meta, bias)
