"""Quantization methods by name: each maps ``(W, H, config)`` to what a layer stores on disk.

The pipeline only ever calls ``get_method(name).quantize(W, H, config)`` and receives a
:class:`LayerQuant`; it never special-cases a method. A new method registers itself with
:func:`register_method` when its module is imported; :func:`get_method` imports the known
optional modules on demand, so ``get_method("ssqr")`` works without an explicit import.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "LayerQuant",
    "Method",
    "register_method",
    "get_method",
    "list_methods",
    "bits_per_weight",
    "UnknownMethodError",
    "rtn_loss",
    "grid_layer_stats",
    "stored_weight",
]


@dataclass
class LayerQuant:
    """One quantized layer.

    Q: dequantized weight, W's shape and dtype; fed forward to later layers and evaluated.
    tensors: what the layer stores on disk in its method's format, keys without module prefix.
    stats: per-layer numbers for the log (loss, rtn_loss, bound, clipped, damp, time_s,
      bits_per_weight, ...); plain floats so they serialise to JSON.
    """

    Q: torch.Tensor
    tensors: dict[str, torch.Tensor]
    stats: dict[str, float]


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its config dataclass, the layer function, its format."""

    name: str
    config_cls: type
    quantize: Callable[[torch.Tensor, torch.Tensor, object], LayerQuant]
    format: str
    description: str = ""


class UnknownMethodError(ValueError):
    """Raised for a method name that no module registers."""


_REGISTRY: dict[str, Method] = {}

# Modules that register further methods when imported; loaded only when a name is unknown.
_OPTIONAL_MODULES = ("latticequant.ssqr", "latticequant.hptq")


def register_method(method: Method) -> Method:
    """Make ``method`` available by name; registering the same name twice replaces it."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method expects a Method, got {type(method).__name__}")
    if not method.name or not method.name.replace("-", "_").isidentifier():
        raise ValueError(f"method name must be a simple identifier, got {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def _load_optional_modules() -> None:
    for module in _OPTIONAL_MODULES:
        if importlib.util.find_spec(module) is None:
            continue  # not written yet or not shipped: nothing to register
        importlib.import_module(module)


def list_methods() -> list[str]:
    """Names of all methods, the optional modules included, sorted."""
    _load_optional_modules()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """The method registered as ``name``; a clear error listing the known names otherwise."""
    if name not in _REGISTRY:
        _load_optional_modules()
    if name not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown quantization method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def bits_per_weight(tensors: dict[str, torch.Tensor], n_weights: int) -> float:
    """Bits stored per weight, counted from the real sizes of everything the layer stores."""
    if n_weights <= 0:
        raise ValueError(f"n_weights must be positive, got {n_weights}")
    total_bits = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    return total_bits / n_weights


def rtn_loss(
    W: torch.Tensor,
    H: torch.Tensor,
    config,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> float:
    """``tr((W - Q) H (W - Q)^T)`` of round-to-nearest on the layer's static grid.

    The same number as ``latticequant.rtn_quantize(W, H, config).loss.sum()`` without its
    bound, so that every layer's log can carry the RTN baseline at little cost. ``scales`` and
    ``zeros`` reuse a static grid already fitted (by the method itself) instead of refitting.
    """
    from latticequant.grid import group_index, round_to_grid, static_grid

    dead = torch.diagonal(H) == 0
    Wg = W
    if bool(dead.any()):  # as the core does: inputs that never fire get weight 0
        Wg = W.clone()
        Wg[:, dead] = 0
    if scales is None:
        scales, zeros = static_grid(Wg, config)
    g_idx = group_index(W.shape[1], config.group_size).to(W.device)
    s, z = scales[:, g_idx].to(W.dtype), zeros[:, g_idx].to(W.dtype)
    Q = s * (round_to_grid(Wg, s, z, config.maxq, clip=config.clip) - z)
    E = W - Q
    return float(((E @ H.to(E.dtype)) * E).sum(dtype=torch.float64))


def grid_layer_stats(result, rtn_loss_value: float) -> dict[str, float]:
    """The common log entries of a grid quantizer's :class:`~latticequant.QuantResult`."""
    return {
        "loss": float(result.loss.sum()),
        "rtn_loss": float(rtn_loss_value),
        "bound": float(result.bound.sum()),
        "clipped": int(result.clipped),
        "clipped_frac": int(result.clipped) / max(1, result.codes.numel()),
        "overflow": int(result.overflow),
        "damp": float(result.damp),
        "time_s": float(result.time_s),
    }


def stored_weight(result, scale_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """``Q`` as a loader reads it back: the scales rounded to their stored dtype."""
    scales = result.scales.to(scale_dtype).to(dtype)
    g = result.g_idx
    return scales[:, g] * (result.codes.to(dtype) - result.zeros.to(dtype)[:, g])


def _grid_method(core_name: str) -> Callable[[torch.Tensor, torch.Tensor, object], LayerQuant]:
    """The layer function of a grid quantizer of the core (rtn, gptq, babai), packed as GPTQ."""

    def quantize(W: torch.Tensor, H: torch.Tensor, config) -> LayerQuant:
        import latticequant as lq
        from latticequant.formats import pack_gptq

        core = getattr(lq, f"{core_name}_quantize")
        # Solve in float64: the layers are small enough that it costs little, and the two
        # derivations (GPTQ, Babai) then round every weight the same way, ties included.
        result = core(W.to(torch.float64), H.to(torch.float64), config)
        if core_name == "rtn":
            base = float(result.loss.sum())
        elif config.static_groups:  # the method's grid is the static one: reuse it
            base = rtn_loss(W, H, config, result.scales, result.zeros)
        else:
            base = rtn_loss(W, H, config)
        checkpoint_format = config.extra.get("checkpoint_format", "gptq")
        tensors = pack_gptq(result, checkpoint_format=checkpoint_format)
        # Feed forward exactly what a loader reads back (scales rounded to their stored dtype).
        Q = stored_weight(result, tensors["scales"].dtype, W.dtype)
        stats = grid_layer_stats(result, base)
        stats["bits_per_weight"] = bits_per_weight(tensors, W.numel())
        return LayerQuant(Q=Q, tensors=tensors, stats=stats)

    quantize.__name__ = f"{core_name}_layer"
    quantize.__doc__ = f"One layer by ``latticequant.{core_name}_quantize``, GPTQ format."
    return quantize


def _register_core_methods() -> None:
    from latticequant.config import QuantConfig

    descriptions = {
        "rtn": "round to nearest on the grid (baseline, no Hessian)",
        "gptq": "GPTQ: column by column with OBS error feedback",
        "babai": "Babai's nearest plane on the Hessian lattice (back-to-front GPTQ)",
    }
    for name, description in descriptions.items():
        register_method(
            Method(
                name=name,
                config_cls=QuantConfig,
                quantize=_grid_method(name),
                format="gptq",
                description=description,
            )
        )


_register_core_methods()
