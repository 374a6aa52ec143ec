"""Quantization methods by name: each maps ``(W, H, config)`` to what a layer stores on disk.

The pipeline only ever calls ``get_method(name)``: ``check(config, d_out, d_in)`` for every layer
before any slow work, then ``quantize(W, H, config)``, which returns a :class:`LayerQuant`; it
never special-cases a method. A method registers itself with :func:`register_method` when its
module is imported; :mod:`latticequant.methods` imports every module that ships one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "LayerQuant",
    "Method",
    "UnknownMethodError",
    "UnsupportedConfigError",
    "register_method",
    "unregister_method",
    "get_method",
    "list_methods",
    "config_to_dict",
    "settable_fields",
]


@dataclass
class LayerQuant:
    """One quantized layer.

    Q: dequantized weight, W's shape and dtype; fed forward to later layers and evaluated.
      None once the pipeline has written it into its layer (the layer's weight is Q then).
    tensors: what the layer stores on disk in its method's format, keys without module prefix.
    stats: per-layer numbers for the log (loss, rtn_loss, bound, clipped, damp, time_s,
      bits_per_weight, ...); plain floats so they serialise to JSON.
    """

    Q: torch.Tensor | None
    tensors: dict[str, torch.Tensor]
    stats: dict[str, float]


class UnsupportedConfigError(ValueError):
    """A config (or a layer's shape) that the method's format cannot store; says what to use."""


def _accept_all(config, d_out: int | None = None, d_in: int | None = None) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its config dataclass, the layer function, its format.

    check: ``check(config, d_out=None, d_in=None)`` raises :class:`UnsupportedConfigError` when
    ``config`` (for a layer of shape ``(d_out, d_in)``, when given) cannot be stored in the
    method's format. The command line calls it on the config before loading the model, the
    pipeline for every layer before any forward pass, so an impossible combination is refused
    up front, never turned into a layer left in float.
    """

    name: str
    config_cls: type
    quantize: Callable[[torch.Tensor, torch.Tensor, object], LayerQuant]
    format: str
    description: str = ""
    check: Callable[..., None] = _accept_all


class UnknownMethodError(ValueError):
    """Raised for a method name that no module registers."""


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` available by name; registering the same name twice replaces it."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method expects a Method, got {type(method).__name__}")
    if not method.name or not method.name.replace("-", "_").isidentifier():
        raise ValueError(f"method name must be a simple identifier, got {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method registered by :func:`register_method` (plug-ins, tests)."""
    _REGISTRY.pop(name, None)


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """The method registered as ``name``; a clear error listing the known names otherwise."""
    if name not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown quantization method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def config_to_dict(config) -> dict:
    """A config dataclass as JSON-ready values (tensors become lists; ``extra`` is dropped)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name == "extra":
            continue
        value = getattr(config, f.name)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        out[f.name] = value
    return out


def settable_fields(config_cls) -> list[dataclasses.Field]:
    """The fields a user sets by flag or override: scalar defaults, not marked internal.

    A field is internal when its metadata says so (``field(metadata={"internal": True})``):
    methods set it themselves (for example the smallest zero point a file format can hold).
    """
    out = []
    for f in dataclasses.fields(config_cls):
        if f.default is dataclasses.MISSING or f.metadata.get("internal"):
            continue
        if isinstance(f.default, (bool, int, float, str)):
            out.append(f)
    return out
