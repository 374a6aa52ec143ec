"""Methods: the registry and every method that maps ``(W, H, config)`` to stored tensors.

Layer 2 of the package: imports :mod:`latticequant.core` and :mod:`latticequant.formats`.
Importing this package registers every method it ships (``rtn``, ``gptq``, ``babai``, ``ssqr``,
``hptq``, ``hrtn``).
"""

from latticequant.methods import grid, hptq, ssqr  # noqa: F401  (each registers its methods)
from latticequant.methods.registry import (
    LayerContext,
    LayerQuant,
    Method,
    UnknownMethodError,
    UnsupportedConfigError,
    config_to_dict,
    get_method,
    list_methods,
    register_method,
    settable_fields,
    unregister_method,
)

__all__ = [
    "LayerContext",
    "LayerQuant",
    "Method",
    "UnknownMethodError",
    "UnsupportedConfigError",
    "config_to_dict",
    "get_method",
    "list_methods",
    "register_method",
    "settable_fields",
    "unregister_method",
]
