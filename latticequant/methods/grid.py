"""The grid methods ``rtn``, ``gptq``, ``babai`` and ``kbest``: the core's quantizers on a b-bit
grid, stored in a grid format (GPTQ v1 or v2, compressed-tensors).

Each layer is solved in float64 (the layers are small enough that it costs little, and the two
derivations, GPTQ and Babai, then round every weight the same way, ties included), on the grid its
format can hold (:meth:`Format.min_zero`), packed by the format and fed forward exactly as the
format dequantizes it (scales rounded to float16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from latticequant.core.babai import babai_basis, babai_quantize
from latticequant.core.config import QuantConfig
from latticequant.core.gptq import gptq_factor, gptq_quantize
from latticequant.core.hessian import check_inputs, solve_diagonal
from latticequant.core.kbest import kbest_quantize
from latticequant.core.refine import refine
from latticequant.core.result import QuantResult
from latticequant.core.rtn import rtn_factor, rtn_loss, rtn_quantize
from latticequant.formats.gptq import GPTQ_V1
from latticequant.methods.registry import (
    LayerContext,
    LayerQuant,
    Method,
    RowSolver,
    UnsupportedConfigError,
    register_method,
    row_chunks,
)

__all__ = [
    "GridRows",
    "chunk_seed",
    "KBestConfig",
    "grid_layer_stats",
    "CORE_QUANTIZERS",
]


@dataclass(frozen=True)
class KBestConfig(QuantConfig):
    """K-best decoding (:func:`~latticequant.kbest_quantize`) on the grid of a QuantConfig.

    beam: candidates kept per row at every step (1: Babai's nearest plane).
    klein_paths: randomised nearest-plane paths added to the candidates (0: none).
    seed: seed of those paths (on the command line, the same ``--seed`` as the windows').
    """

    beam: int = 4
    klein_paths: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beam, bool) or not isinstance(self.beam, int) or self.beam < 1:
            raise ValueError(f"beam must be a positive integer, got {self.beam!r}")
        paths = self.klein_paths
        if isinstance(paths, bool) or not isinstance(paths, int) or paths < 0:
            raise ValueError(f"klein_paths must be a non-negative integer, got {paths!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


def _kbest(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: KBestConfig,
    min_zero: int = 0,
    seed: int | None = None,
    factor: tuple | None = None,
    **grid,
) -> QuantResult:
    return kbest_quantize(
        W, H, cfg, beam=cfg.beam, klein_paths=cfg.klein_paths,
        seed=cfg.seed if seed is None else seed, min_zero=min_zero, factor=factor, **grid,
    )  # fmt: skip


CORE_QUANTIZERS: dict[str, Callable[..., QuantResult]] = {
    "rtn": rtn_quantize,
    "gptq": gptq_quantize,
    "babai": babai_quantize,
    "kbest": _kbest,
}


def check_kbest_layer(config: QuantConfig, d_out: int | None = None, d_in: int | None = None):
    """A grid fixed before the decode (the format's limits are its own check)."""
    if not config.static_groups and config.group_size != -1:
        raise UnsupportedConfigError(
            "kbest keeps several candidates per row, which a grid refitted along the decode "
            "would split; use --static-groups (the default)"
        )


def grid_layer_stats(result: QuantResult, rtn_loss: float) -> dict[str, float]:
    """The common log entries of a grid quantizer's :class:`~latticequant.QuantResult`."""
    return {
        "loss": float(result.loss.sum()),
        "rtn_loss": float(rtn_loss),
        "bound": float(result.bound.sum()),
        "clipped": int(result.clipped),
        "clipped_frac": int(result.clipped) / max(1, result.codes.numel()),
        "overflow": int(result.overflow),
        "damp": float(result.damp),
        "time_s": float(result.time_s),
    }


def _rtn_baseline(
    W: torch.Tensor,
    H: torch.Tensor,
    config: QuantConfig,
    result: QuantResult,
    min_zero: int,
    integer_zeros: bool = True,
):
    """RTN's loss on the method's own static grid (or its own fit when grids are refitted)."""
    if config.static_groups:
        return rtn_loss(
            W, H, config, scales=result.scales, zeros=result.zeros, integer_zeros=integer_zeros
        )
    return rtn_loss(W, H, config, min_zero=min_zero)


def chunk_seed(seed: int, start: int) -> int:
    """The seed of the Klein paths of the row block starting at row ``start``: per block, so a
    block draws the same paths whichever rank solves it."""
    return (int(seed) * 0x9E3779B97F4A7C15 + start * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def _factor(cache: dict, kind: str, H: torch.Tensor, config: QuantConfig, team=None):
    """The factor of ``kind`` for H and config, computed on first use and kept in ``cache``
    (by the ``team`` of ranks together, when one is given)."""
    if kind not in cache:
        h, _ = solve_diagonal(H)
        make = {
            "gptq": lambda: gptq_factor(H, config, h, team),
            "babai": lambda: babai_basis(H, config, h, torch.float64, team),
            "rtn": lambda: rtn_factor(H, config, h),
        }[kind]
        cache[kind] = make()
    return cache[kind]


_FACTOR_OF = {"rtn": "rtn", "gptq": "gptq", "babai": "babai", "kbest": "babai"}


@dataclass
class GridRows:
    """One row block's solution: its rows of the codes and grid, and its share of the stats
    (per-row tensors, and the sums over its rows). ``g_idx``, ``order``, ``D`` and ``damp``
    are the layer's, the same in every block."""

    start: int
    stop: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    loss: torch.Tensor
    bound: torch.Tensor
    clipped: int
    overflow: int
    g_idx: torch.Tensor
    order: torch.Tensor
    D: torch.Tensor
    damp: float
    bits: int
    sums: dict[str, float]
    time_s: float


def _codes_for_transfer(codes: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Codes in the narrowest integer type that holds them (a quarter of int32 when clipped)."""
    if config.clip and config.bits <= 8:
        return codes.to(torch.uint8)
    if config.clip and config.bits <= 15:
        return codes.to(torch.int16)
    return codes.to(torch.int32)


def combine_rows(
    parts: list[GridRows], W: torch.Tensor, config: QuantConfig, context: LayerContext | None
) -> LayerQuant:
    """One layer's result from its row blocks (solved by any ranks, in any order): packed by
    the context's format and fed forward as the format dequantizes it."""
    fmt = (context or LayerContext(GPTQ_V1)).format
    parts = sorted(parts, key=lambda p: p.start)
    if [(p.start, p.stop) for p in parts] != row_chunks(W.shape[0]):
        raise RuntimeError("the row blocks of a layer do not cover its rows")
    dev, first = W.device, parts[0]

    def cat(field: str, dtype=None) -> torch.Tensor:
        t = torch.cat([getattr(p, field) for p in parts])
        return t.to(device=dev, dtype=dtype)

    result = QuantResult(
        codes=cat("codes", torch.int64),
        scales=cat("scales"),
        zeros=cat("zeros"),
        g_idx=first.g_idx.to(dev),
        Q=None,
        order=first.order.to(dev),
        loss=cat("loss"),
        bound=cat("bound"),
        clipped=sum(p.clipped for p in parts),
        overflow=sum(p.overflow for p in parts),
        damp=first.damp,
        D=first.D.to(dev),
        bits=first.bits,
        time_s=sum(p.time_s for p in parts),
    )
    tensors = fmt.pack(result)
    Q = fmt.dequantize(tensors, {"bits": config.bits}, W.dtype)  # as a loader reads it
    totals: dict[str, float] = {}
    for p in parts:  # block by block, in row order: the same additions on any rank count
        for key, value in p.sums.items():
            totals[key] = totals.get(key, 0.0) + value
    stats = grid_layer_stats(result, totals.pop("rtn_loss"))
    if "gptq_loss" not in totals:  # GPTQ itself, unrefined
        totals["gptq_loss"] = result.proxy_loss
    stats.update(totals)
    stats["row_blocks"] = len(parts)
    stats["bits_per_weight"] = fmt.effective_bits(tensors, W.numel())
    return LayerQuant(Q=Q, tensors=tensors, stats=stats)


def _grid_rows(name: str):
    core = CORE_QUANTIZERS[name]
    kind = _FACTOR_OF[name]

    def solve(
        W: torch.Tensor,
        H: torch.Tensor,
        config: QuantConfig,
        context: LayerContext | None,
        start: int,
        cache: dict,
    ) -> GridRows:
        fmt = (context or LayerContext(GPTQ_V1)).format
        min_zero = fmt.min_zero(config)  # what the format's zero points can hold
        # W's rows in float64; H as given: every core function takes its own float64 copy
        # of what it needs, and a second one here would be 1.6 GB at Llama-3-8B's down_proj
        W64 = W.to(torch.float64)
        check_inputs(W64, H)  # before any factor: a bad input is named as such
        kw = {"min_zero": min_zero, "factor": _factor(cache, kind, H, config)}
        if name == "kbest":
            kw["seed"] = chunk_seed(config.seed, start)
        result = core(W64, H, config, **kw)
        base = (
            result.proxy_loss if name == "rtn" else _rtn_baseline(W64, H, config, result, min_zero)
        )
        sums: dict[str, float] = {"rtn_loss": float(base)}
        if name != "gptq" or config.refine_steps:  # GPTQ's loss, to read this one against
            gptq = gptq_quantize(
                W64, H, config, min_zero=min_zero, factor=_factor(cache, "gptq", H, config)
            )
            sums["gptq_loss"] = gptq.proxy_loss
        if config.refine_steps:
            result, refined = refine(
                W64,
                H,
                result,
                config,
                steps=config.refine_steps,
                sweeps=config.refine_sweeps,
                rounds=config.refine_rounds,
                min_zero=min_zero,
            )
            sums.update(refined)
        return GridRows(
            start=start,
            stop=start + W.shape[0],
            codes=_codes_for_transfer(result.codes, config).cpu(),
            scales=result.scales.cpu(),
            zeros=result.zeros.cpu(),
            loss=result.loss.cpu(),
            bound=result.bound.cpu(),
            clipped=int(result.clipped),
            overflow=int(result.overflow),
            g_idx=result.g_idx.cpu(),
            order=result.order.cpu(),
            D=result.D.cpu(),
            damp=float(result.damp),
            bits=int(result.bits),
            sums=sums,
            time_s=float(result.time_s),
        )

    def prepare(H: torch.Tensor, config: QuantConfig, cache: dict, team=None) -> None:
        """The factors the blocks read, made by every rank of ``team`` together (each rank
        calls it, in the same order): the factorization is shared out, not repeated."""
        if name != "gptq" or config.refine_steps:  # for the GPTQ loss it is read against
            _factor(cache, "gptq", H, config, team)
        _factor(cache, kind, H, config, team)

    return RowSolver(solve=solve, combine=combine_rows, prepare=prepare)


def _on_fixed_grid(name: str, W: torch.Tensor, H: torch.Tensor, fixed, fmt) -> LayerQuant:
    """One whole layer decoded on the grid its format fixed (real offsets, blocks of the
    format's own), packed by that grid: the decode's error feedback on a file format's scales."""
    core, config = CORE_QUANTIZERS[name], fixed.config
    W64 = W.to(torch.float64)
    grid = {"scales": fixed.scales, "zeros": fixed.zeros, "integer_zeros": False}
    if fixed.levels is not None:  # a codebook (IQ4_NL): every decoder rounds to its levels
        grid["levels"] = fixed.levels
    result = core(W64, H, config, **grid)
    base = result.proxy_loss if name == "rtn" else rtn_loss(W64, H, config, **grid)
    gptq = result if name == "gptq" and not config.refine_steps else None
    gptq = gptq or gptq_quantize(W64, H, config, **grid)
    refined = {}
    if config.refine_steps:  # codes only ("cd"): the format's scales stay as it fixed them
        result, refined = refine(
            W64, H, result, config, steps=config.refine_steps, sweeps=config.refine_sweeps,
            rounds=config.refine_rounds, scale_dtype=torch.float64, levels=fixed.levels,
        )  # fmt: skip
    del W64
    tensors = fixed.pack(result)
    Q = fmt.dequantize(tensors, {"bits": config.bits}, W.dtype)  # as a loader reads it
    stats = grid_layer_stats(result, base)
    stats["gptq_loss"] = gptq.proxy_loss
    stats.update(refined)
    stats["bits_per_weight"] = fmt.effective_bits(tensors, W.numel())
    return LayerQuant(Q=Q, tensors=tensors, stats=stats)


def _grid_method(name: str) -> tuple[Callable[..., LayerQuant], RowSolver]:
    rows = _grid_rows(name)

    def quantize(
        W: torch.Tensor, H: torch.Tensor, config: QuantConfig, context: LayerContext | None = None
    ) -> LayerQuant:
        context = context or LayerContext(GPTQ_V1)
        # a format with its own scale choice (GGUF) fixes the grid; the method decodes on it
        fixed = context.format.layer_grid(W.to(torch.float64), H, config, context.name)
        if fixed is not None:
            return _on_fixed_grid(name, W, H, fixed, context.format)
        return rows.quantize(W, H, config, context)

    quantize.__name__ = f"{name}_layer"
    quantize.__doc__ = (
        f"One layer by ``latticequant.{name}_quantize``, in the context's format, solved in the "
        "fixed row blocks of :func:`~latticequant.methods.registry.row_chunks`."
    )
    return quantize, rows


GRID_FORMATS = ("gptq", "gptq_v2", "compressed-tensors", "gguf")
GRID_DEFAULTS = {"order": "act"}
"""Act-order with static groups (the config's own default) decodes in the order GPTQ's users
expect at no extra cost and still writes the natural ``g_idx`` every GPTQ reader loads; it is
what a run uses unless told otherwise (``benchmarks/bench_defaults.py`` compares it with the
natural order and the costlier settings, docs/bench_defaults.md)."""

for _name, _description, _config, _check in (
    ("rtn", "round to nearest on the grid (baseline, no Hessian)", QuantConfig, None),
    ("gptq", "GPTQ: column by column with OBS error feedback", QuantConfig, None),
    (
        "babai",
        "Babai's nearest plane on the Hessian lattice (back-to-front GPTQ)",
        QuantConfig,
        None,
    ),
    (
        "kbest",
        "K-best list decoding on the Hessian lattice (Babai's point among the candidates)",
        KBestConfig,
        check_kbest_layer,
    ),
):
    _quantize, _rows = _grid_method(_name)
    register_method(
        Method(
            name=_name,
            config_cls=_config,
            quantize=_quantize,
            rows=_rows,
            formats=GRID_FORMATS,
            description=_description,
            defaults=GRID_DEFAULTS,
            **({"check": _check} if _check else {}),
        )
    )
