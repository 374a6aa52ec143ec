"""The format protocol: everything the package knows about one way of storing a quantized layer.

A :class:`Format` says what its grid can represent (a method checks its config against it
before any slow work), how a method's result is packed into tensors and read back, how those
tensors dequantize, how many bits per weight they cost, which module runs them, and what the
checkpoint's file-level config (``quantize_config.json``, ``config.json``'s
``quantization_config``) says about them and whether that agrees with a layer's stored
tensors. The checkpoint writer and loader, the command line and the methods look formats up
here by name and never match a name themselves: a new format is one module that defines a
:class:`Format` and one :func:`register_format` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from latticequant.core.rotation import Rotation
from latticequant.formats.bits import effective_bits
from latticequant.formats.packing import FormatError
from latticequant.formats.quantize_config import dynamic_overrides, layer_claim

__all__ = [
    "Format",
    "LayerGrid",
    "UnsupportedConfigError",
    "register_format",
    "get_format",
    "format_names",
    "formats_storing",
    "quant_methods",
    "formats_reading",
    "key_kind",
    "kernel_description",
]


class UnsupportedConfigError(ValueError):
    """A config (or a layer's shape) that a format cannot store; says what to use instead."""


@dataclass(frozen=True)
class LayerGrid:
    """A grid a format fixes for one layer before the decode (:meth:`Format.layer_grid`).

    config: the layer's config on that grid (its bits and group size); scales, zeros:
    ``(d_out, n_groups)`` real scales and offsets, ``q = s * (z - o)`` (offsets need not be
    integers: the core's ``integer_zeros=False``); pack: the layer's tensors from a core
    result decoded on that grid; kind: what the grid is, for the log; levels: a codebook the
    codes index (``q = s * (levels[z] - o)``, sorted, in units of the scale), None for the
    uniform grid ``z`` itself.
    """

    config: object
    scales: torch.Tensor
    zeros: torch.Tensor
    pack: Callable[..., dict]
    kind: str = ""
    levels: torch.Tensor | None = None


class Format:
    """One registered way of storing a quantized linear layer.

    name: what ``--checkpoint-format`` and a checkpoint's module table call it.
    keys: the tensors every layer of the format stores (keys without the module prefix);
      optional_keys: tensors it reads when present.
    key_kinds: what each key is, for reports that group the bits by kind.
    kernels: what each ``last_kernel`` value of its module means, for ``eval``/``generate``.
    quant_method: the file-level ``quant_method`` of a checkpoint made of this format: "gptq"
      only where every GPTQ reader may take the file.
    writes_quantize_config: whether the checkpoint also holds ``quantize_config.json`` (the
      GPTQ ecosystem's file; compressed-tensors checkpoints have none).
    rotation_hint: what ``--rotate`` is told when the format has no rotated variant.
    container: what a run writes: ``"folder"`` (a checkpoint folder) or the name of a
      single-file container the pipeline knows how to write (``"gguf"``).
    """

    name: str = ""
    keys: tuple[str, ...] = ()
    optional_keys: tuple[str, ...] = ()
    key_kinds: Mapping[str, str] = {}
    kernels: Mapping[str, str] = {}
    quant_method: str = "latticequant"
    writes_quantize_config: bool = True
    rotation_hint: str = "use --rotate none"
    container: str = "folder"
    fixes_grid: bool = False  # it chooses each layer's grid itself (layer_grid): whole layers

    def for_model(self, config, options: Mapping) -> Format:
        """This format bound to one model (its Hugging Face ``config``) and the run's output
        ``options`` (a format whose layers depend on the whole model, as GGUF's type mix does);
        refuses what it cannot write in one line. The format itself by default."""
        return self

    def run_notes(self) -> list[str]:
        """Lines a run's summary prints about how this (bound) format stores the model: what
        it chose per tensor beyond what the user asked (GGUF's fallbacks). None by default."""
        return []

    def layer_grid(self, W: torch.Tensor, H: torch.Tensor, config, name: str) -> LayerGrid | None:
        """The grid this format fixes for layer ``name`` before the decode, or None when the
        method fits its own (every format but a file format with its own scale choice)."""
        return None

    # -- what the grid can represent -----------------------------------------------------------

    def check(self, config, d_out: int | None = None, d_in: int | None = None) -> None:
        """Raise :class:`UnsupportedConfigError` for a config (and, when given, a layer shape)
        this format cannot store, naming what to use instead."""

    def min_zero(self, config) -> int:
        """The smallest integer offset an asymmetric grid of ``config`` may take here."""
        return 0

    # -- tensors ---------------------------------------------------------------------------------

    def layer_rotation(self, n: int, seed: int) -> tuple[Rotation, dict[str, torch.Tensor]]:
        """A rotated variant's rotation of a layer with ``n`` inputs, and the tensors the layer
        stores for it (``seed``: the layer's, for a variant that draws its rotations)."""
        raise NotImplementedError(f"format {self.name!r} rotates no layer")

    def pack(self, result) -> dict[str, torch.Tensor]:
        """The tensors one layer stores for a method's ``result``."""
        raise NotImplementedError(f"format {self.name!r} does not pack results")

    def unpack(self, tensors: Mapping[str, torch.Tensor], meta: Mapping):
        """The integer codes and grid back from stored tensors (format-specific parts)."""
        raise NotImplementedError(f"format {self.name!r} does not unpack")

    def dequantize(
        self, tensors: Mapping[str, torch.Tensor], meta: Mapping, dtype: torch.dtype
    ) -> torch.Tensor:
        """``W`` ``(d_out, d_in)`` as the stored tensors define it, in ``dtype``."""
        raise NotImplementedError(f"format {self.name!r} does not dequantize")

    def effective_bits(self, tensors: Mapping[str, torch.Tensor], n_weights: int) -> float:
        """Bits per weight of everything a layer stores (formats/bits.py)."""
        return effective_bits(tensors, n_weights)

    def module(
        self, tensors: Mapping[str, torch.Tensor], meta: Mapping, bias: torch.Tensor | None = None
    ) -> nn.Module:
        """The inference module of one layer (``meta``: what the checkpoint records of it,
        ``bits``, ``in_features``, ``out_features``, and loader options ``backend``,
        ``cache_weight``)."""
        raise NotImplementedError(f"format {self.name!r} has no module")

    def owns(self, keys: set[str]) -> bool:
        """Whether a layer storing exactly ``keys`` is of this format: a module's tensors, not
        what its config entry claims, decide its kind."""
        return set(self.keys) <= keys <= set(self.keys) | set(self.optional_keys)

    # -- the file-level config -------------------------------------------------------------------

    def file_config(self, base: Mapping, meta: Mapping) -> dict:
        """The checkpoint's ``quantization_config`` for layers of this format.

        base: ``bits``, ``group_size``, ``sym``, ``desc_act`` of the run's config (what most
        layers store); meta: the method and its settings, recorded under ``meta``.
        """
        return {
            "bits": base.get("bits"),
            "group_size": base.get("group_size", -1),
            "desc_act": bool(base.get("desc_act", False)),
            "true_sequential": True,
            "checkpoint_format": self.name,
            "quant_method": self.quant_method,
        }

    def layers_config(
        self,
        base: Mapping,
        meta: Mapping,
        modules: Mapping[str, Mapping],
        skipped: list[str],
        float_linears: list[str],
    ) -> dict:
        """The checkpoint's ``quantization_config`` once every layer is known.

        modules: the module table (name -> ``bits``, ``group_size``, ``sym``, ``keys``...);
        skipped: the blocks' linear layers left in float; float_linears: every linear layer of
        the model left in float (``lm_head`` included). By default :meth:`file_config` plus
        GPTQModel's ``dynamic`` rules for the layers that differ from ``base``.
        """
        config = self.file_config(base, meta)
        dynamic = dynamic_overrides(modules, skipped, base)
        if dynamic:
            config["dynamic"] = dynamic
        return config

    def reads(self, file_config: Mapping) -> bool:
        """Whether a checkpoint with this file-level config may hold layers of this format."""
        return file_config.get("quant_method") == self.quant_method

    def layer_claim(self, name: str, file_config: Mapping) -> dict | None:
        """What the file-level config says of layer ``name`` (``bits``, ``group_size``,
        ``sym``), or None when it says the layer is stored in float. By default GPTQModel's
        reading: the base values, a ``dynamic`` ``+:`` rule's changes, ``-:`` for a skip."""
        return layer_claim(file_config, name)

    def check_file_config(
        self, name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping, file_config: Mapping
    ) -> None:
        """Raise :class:`FormatError` when the file-level config (what other tools read)
        contradicts layer ``name``'s stored ``tensors`` (``meta``: :meth:`module_meta`). By
        default: its ``quant_method`` must be one this format is read under (else that
        method's readers would run the layer wrong), and it must not skip the layer."""
        method = file_config.get("quant_method")
        if not self.reads(file_config):
            raise FormatError(
                f"the layer is {self.name} but the file-level quant_method is {method!r}: "
                "that method's readers would run it wrong"
            )
        if self.layer_claim(name, file_config) is None:
            raise FormatError(
                "it is stored quantized but the file-level config skips it (a dynamic '-:' rule)"
            )

    def infer_modules(self, file_config: Mapping, tensors: Mapping[str, torch.Tensor]) -> dict:
        """The module table of a checkpoint of this format written without our section (by
        another tool), from its file-level config and tensor names; empty when it cannot."""
        return {}

    def shared_tensors(self, entry: Mapping) -> dict[str, str]:
        """Tensors a layer reads from elsewhere in the file, by its module table ``entry``:
        local key (as :meth:`module` receives it) -> the file's key. A transform matrix that
        several layers share is stored once, under one of them. None by default."""
        return {}

    def module_meta(self, entry: Mapping, file_config: Mapping, name: str = "") -> dict:
        """What :meth:`module` and :meth:`dequantize` need of one layer, from its entry in the
        checkpoint's module table, the file-level config and its name (a file-level transform
        names the layers it applies to)."""
        meta = {"bits": entry.get("bits", file_config.get("bits"))}
        for key in ("in_features", "out_features"):
            if key in entry:
                meta[key] = entry[key]
        return meta


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Make ``fmt`` available by its name; a name registered twice is an error."""
    if not isinstance(fmt, Format) or not fmt.name:
        raise TypeError("register_format expects a named Format")
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered format ``name``; a one-line :class:`FormatError` listing the known ones."""
    if name not in _FORMATS:
        raise FormatError(f"unknown format {name!r}; known: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def format_names() -> tuple[str, ...]:
    return tuple(sorted(_FORMATS))


def formats_storing(keys: set[str]) -> list[Format]:
    """The registered formats whose layers store exactly ``keys`` (several formats may share a
    layout, as GPTQ v1 and v2 do: the file-level config tells them apart)."""
    return [fmt for fmt in _FORMATS.values() if fmt.owns(set(keys))]


def formats_reading(file_config) -> list[Format]:
    """The registered formats a checkpoint with this file-level config may hold (none: not a
    checkpoint the loader reads)."""
    if not isinstance(file_config, Mapping):
        return []
    return [fmt for fmt in _FORMATS.values() if fmt.reads(file_config)]


def quant_methods() -> tuple[str, ...]:
    """The file-level ``quant_method`` values of the registered formats."""
    return tuple(sorted({fmt.quant_method for fmt in _FORMATS.values()}))


def key_kind(key: str) -> str:
    """What a stored key is ("codes", "scales", ...), for the bits breakdown of a report."""
    for fmt in _FORMATS.values():
        if key in fmt.key_kinds:
            return fmt.key_kinds[key]
    return key


def kernel_description(kernel: str) -> str:
    """What a module's ``last_kernel`` value means."""
    for fmt in _FORMATS.values():
        if kernel in fmt.kernels:
            return fmt.kernels[kernel]
    return kernel
