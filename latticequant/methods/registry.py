"""Quantization methods by name: each maps ``(W, H, config)`` to what a layer stores on disk.

The pipeline only ever calls ``get_method(name)``: :meth:`Method.refuse` for every layer before
any slow work, then ``quantize(W, H, config, context)``, which returns a :class:`LayerQuant`; it
never special-cases a method. The :class:`LayerContext` tells the method which registered format
its layer is stored in (:mod:`latticequant.formats.protocol`) and how many bits per weight the
pipeline stores beside it. A method registers itself with :func:`register_method` when its
module is imported; :mod:`latticequant.methods` imports every module that ships one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from latticequant.formats.protocol import Format, UnsupportedConfigError, get_format

__all__ = [
    "ROW_CHUNKS",
    "CHUNK_MIN_ROWS",
    "ROW_BLOCK_ENV",
    "min_chunk_rows",
    "RowSolver",
    "row_chunks",
    "LayerContext",
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


@dataclass(frozen=True)
class LayerContext:
    """What the pipeline tells a method about the layer it solves.

    format: the registered format the layer is stored in (its grid limits, its packing).
    name: the layer's full name in the model (for messages).
    reserved_bits: bits per weight the pipeline stores beside the method's tensors (a
      rotation's), which a method with a budget of bits takes out of it.
    """

    format: Format
    name: str = ""
    reserved_bits: float = 0.0


#: Most row blocks a layer's rows are solved in.
ROW_CHUNKS = 8
#: The fewest rows a block has. Each block runs the decoder's column loop again, so a small
#: layer stays whole: on a 576-wide model, blocks of 72 rows tripled the solves' time. The
#: environment variable ``LATTICEQUANT_ROW_BLOCK_ROWS`` sets another minimum (every rank of a
#: run must see the same one: torchrun passes the environment on).
CHUNK_MIN_ROWS = 512
ROW_BLOCK_ENV = "LATTICEQUANT_ROW_BLOCK_ROWS"


def min_chunk_rows() -> int:
    """The fewest rows of a row block: ``CHUNK_MIN_ROWS`` or the environment's setting."""
    value = os.environ.get(ROW_BLOCK_ENV)
    if value is None:
        return CHUNK_MIN_ROWS
    try:
        rows = int(value)
    except ValueError:
        rows = 0
    if rows < 1:
        raise ValueError(f"{ROW_BLOCK_ENV}={value!r}: give a positive number of rows, or unset it")
    return rows


def row_chunks(d_out: int) -> list[tuple[int, int]]:
    """The fixed row blocks ``[start, stop)`` a row-separable layer is solved in.

    They depend on ``d_out`` alone, never on the number of ranks: one process solves the same
    blocks one after the other that ranks solve side by side, so every product has the same
    shape either way and the codes are the same bit for bit, whatever the BLAS's blocking.
    """
    n = max(1, min(ROW_CHUNKS, d_out // min_chunk_rows()))
    return [(i * d_out // n, (i + 1) * d_out // n) for i in range(n)]


@dataclass(frozen=True)
class RowSolver:
    """How a method whose rows are independent given H solves a layer by row blocks.

    solve: ``solve(rows, H, config, context, start, cache)`` -> one block's part (a
      picklable object of CPU tensors and numbers) for ``rows``, the rows of W from row
      ``start`` on; ``cache``, a dict shared by the blocks (and the layers) solved on the same
      H and config, keeps what is computed once per H (the factor).
    combine: ``combine(parts, W, config, context)`` -> the layer's :class:`LayerQuant`, from
      every block's part in row order; it needs no H, so every rank can combine what the
      others solved.
    prepare: ``prepare(H, config, cache, team)`` fills ``cache`` with what the blocks read of H,
      every rank of ``team`` calling it together (the factorization shared out); None when
      ``solve`` makes it on first use.
    """

    solve: Callable[..., object]
    combine: Callable[..., LayerQuant]
    prepare: Callable[..., None] | None = None

    def quantize(self, W, H, config, context: LayerContext) -> LayerQuant:
        """The whole layer in one process: every block in order, then combined."""
        cache: dict = {}
        parts = [
            self.solve(W[a:b], H, config, context, a, cache) for a, b in row_chunks(W.shape[0])
        ]
        return self.combine(parts, W, config, context)


def _accept_all(config, d_out: int | None = None, d_in: int | None = None) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its config dataclass, the layer function, its format.

    formats: the registered formats it can write, its default first.
    defaults: what a run uses where the user sets nothing, when it differs from the config
      class's own defaults (the core's functions keep theirs: literal and reproducible).
    check: ``check(config, d_out=None, d_in=None)`` raises :class:`UnsupportedConfigError` for
    what the method itself cannot do (beyond its format's limits, which :meth:`refuse` adds).
    The run's preflight calls :meth:`refuse` on the config and on every layer before any
    forward pass, so an impossible combination is refused up front, never turned into a layer
    left in float.
    rows: set for a method whose rows are independent once H's factor is known; the pipeline
    then shares one layer's row blocks out across ranks (``quantize`` must equal
    ``rows.quantize``). None for methods whose rows are coupled (a common scale search).
    """

    name: str
    config_cls: type
    quantize: Callable[..., LayerQuant]
    formats: tuple[str, ...]
    description: str = ""
    check: Callable[..., None] = _accept_all
    defaults: dict = field(default_factory=dict)
    rows: RowSolver | None = None

    def default_config(self):
        """The config a run uses where the user sets nothing."""
        return self.config_cls(**self.defaults)

    def __post_init__(self) -> None:
        if isinstance(self.formats, str):  # one format named alone
            object.__setattr__(self, "formats", (self.formats,))
        if not self.formats or not all(isinstance(f, str) for f in self.formats):
            raise ValueError(f"method {self.name!r} must name the formats it writes")

    def format(self, name: str | None = None) -> Format:
        """The format ``name`` (the method's default when None), refused in one line when the
        method cannot write it."""
        name = self.formats[0] if name is None else name
        if name not in self.formats:
            raise UnsupportedConfigError(
                f"method {self.name} writes {' or '.join(self.formats)}, not {name!r}; drop "
                f"--checkpoint-format or use one of those"
            )
        return get_format(name)

    def refuse(
        self, config, fmt: Format, d_out: int | None = None, d_in: int | None = None
    ) -> None:
        """Raise :class:`UnsupportedConfigError` for a config (and layer shape) that the method
        cannot solve or ``fmt`` cannot store."""
        fmt.check(config, d_out, d_in)
        self.check(config, d_out, d_in)

    def context(self, fmt: Format | None = None, name: str = "") -> LayerContext:
        return LayerContext(self.format() if fmt is None else fmt, name)


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
    """A config dataclass as JSON-ready values (tensors become lists)."""
    out = {}
    for f in dataclasses.fields(config):
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
