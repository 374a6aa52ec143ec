"""The grid methods ``rtn``, ``gptq`` and ``babai``: the core's quantizers, stored as GPTQ.

Each layer is solved in float64 (the layers are small enough that it costs little, and the two
derivations, GPTQ and Babai, then round every weight the same way, ties included), packed in the
GPTQ layout, and fed forward exactly as a loader reads it back (scales rounded to float16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from latticequant.core.babai import babai_quantize
from latticequant.core.config import QuantConfig
from latticequant.core.gptq import gptq_quantize
from latticequant.core.grid import dequantize
from latticequant.core.kbest import kbest_quantize
from latticequant.core.refine import refine
from latticequant.core.result import QuantResult
from latticequant.core.rtn import rtn_loss, rtn_quantize
from latticequant.formats.bits import effective_bits
from latticequant.formats.gptq import pack_gptq
from latticequant.formats.packing import SUPPORTED_BITS, pack_granularity
from latticequant.methods.registry import (
    LayerQuant,
    Method,
    UnsupportedConfigError,
    register_method,
)

__all__ = [
    "KBestConfig",
    "grid_layer_stats",
    "stored_weight",
    "check_gptq_layer",
    "check_packable",
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


def _kbest(W: torch.Tensor, H: torch.Tensor, cfg: KBestConfig) -> QuantResult:
    return kbest_quantize(W, H, cfg, beam=cfg.beam, klein_paths=cfg.klein_paths, seed=cfg.seed)


CORE_QUANTIZERS: dict[str, Callable[..., QuantResult]] = {
    "rtn": rtn_quantize,
    "gptq": gptq_quantize,
    "babai": babai_quantize,
    "kbest": _kbest,
}

UNCLIPPED_METHODS = "ssqr, hptq or hrtn"


def check_gptq_layer(config: QuantConfig, d_out: int | None = None, d_in: int | None = None):
    """Refuse what the GPTQ layout cannot store: other bit widths, unclipped codes, shapes that
    do not pack (when a shape is given). Each message names the setting and what to use."""
    if config.bits not in SUPPORTED_BITS:
        usable = ", ".join(str(b) for b in SUPPORTED_BITS)
        raise UnsupportedConfigError(
            f"bits={config.bits} (--bits {config.bits}) cannot be stored in the GPTQ format, "
            f"which packs {usable} bits; use one of those"
        )
    if not config.clip:
        raise UnsupportedConfigError(
            "clip=False (--no-clip) leaves codes off the b-bit grid, which the GPTQ format "
            f"cannot store; use a method whose format stores unclipped codes: {UNCLIPPED_METHODS}"
        )
    check_packable(config.bits, d_out, d_in)


def check_kbest_layer(config: QuantConfig, d_out: int | None = None, d_in: int | None = None):
    """The GPTQ format's limits, and a grid fixed before the decode."""
    check_gptq_layer(config, d_out, d_in)
    if not config.static_groups and config.group_size != -1:
        raise UnsupportedConfigError(
            "kbest keeps several candidates per row, which a grid refitted along the decode "
            "would split; use --static-groups (the default)"
        )


def check_packable(bits: int, d_out: int | None = None, d_in: int | None = None) -> None:
    """Refuse a layer whose dimensions do not fill whole words at ``bits`` bits."""
    g = pack_granularity(bits)
    for what, n in (("d_in", d_in), ("d_out", d_out)):
        if n is not None and n % g:
            raise UnsupportedConfigError(
                f"{what}={n} is not a multiple of {g}, which {bits}-bit GPTQ packing needs; "
                f"skip this layer (--skip) or use another --bits"
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


def stored_weight(
    result: QuantResult, scale_dtype: torch.dtype, dtype: torch.dtype
) -> torch.Tensor:
    """``Q`` as a loader reads it back: the scales rounded to their stored dtype (by blocks of
    rows, :func:`~latticequant.core.grid.dequantize`: no per-weight scale matrix)."""
    scales = result.scales.to(scale_dtype).to(dtype)
    return dequantize(result.codes, scales, result.zeros.to(dtype), result.g_idx)


def _rtn_baseline(W: torch.Tensor, H: torch.Tensor, config: QuantConfig, result: QuantResult):
    """RTN's loss on the method's own static grid (or its own fit when grids are refitted)."""
    if config.static_groups:
        return rtn_loss(W, H, config, scales=result.scales, zeros=result.zeros)
    return rtn_loss(W, H, config)


def _grid_method(name: str) -> Callable[[torch.Tensor, torch.Tensor, QuantConfig], LayerQuant]:
    core = CORE_QUANTIZERS[name]

    def quantize(W: torch.Tensor, H: torch.Tensor, config: QuantConfig) -> LayerQuant:
        checkpoint_format = config.extra.get("checkpoint_format", "gptq")
        if checkpoint_format == "gptq" and not config.sym:
            config = config.replace(min_zero=max(config.min_zero, 1))  # v1 stores offset - 1
        # W in float64; H as given: every core function takes its own float64 copy, and a
        # second one here would be 1.6 GB at Llama-3-8B's down_proj
        W64 = W.to(torch.float64)
        result = core(W64, H, config)
        base = result.proxy_loss if name == "rtn" else _rtn_baseline(W64, H, config, result)
        extra: dict[str, float] = {}
        if name != "gptq" or config.refine_steps:  # GPTQ's loss, to read this one against
            extra["gptq_loss"] = gptq_quantize(W64, H, config).proxy_loss
        else:
            extra["gptq_loss"] = result.proxy_loss
        if config.refine_steps:
            result, refined = refine(
                W64,
                H,
                result,
                config,
                steps=config.refine_steps,
                sweeps=config.refine_sweeps,
                rounds=config.refine_rounds,
            )
            extra.update(refined)
        del W64  # 470 MB at 4096 x 14336, before the packing's and Q's own buffers
        tensors = pack_gptq(result, checkpoint_format=checkpoint_format)
        Q = stored_weight(result, tensors["scales"].dtype, W.dtype)
        stats = grid_layer_stats(result, base)
        stats.update(extra)
        stats["bits_per_weight"] = effective_bits(tensors, W.numel())
        return LayerQuant(Q=Q, tensors=tensors, stats=stats)

    quantize.__name__ = f"{name}_layer"
    quantize.__doc__ = f"One layer by ``latticequant.{name}_quantize``, GPTQ format."
    return quantize


for _name, _description, _config, _check in (
    ("rtn", "round to nearest on the grid (baseline, no Hessian)", QuantConfig, check_gptq_layer),
    ("gptq", "GPTQ: column by column with OBS error feedback", QuantConfig, check_gptq_layer),
    (
        "babai",
        "Babai's nearest plane on the Hessian lattice (back-to-front GPTQ)",
        QuantConfig,
        check_gptq_layer,
    ),
    (
        "kbest",
        "K-best list decoding on the Hessian lattice (Babai's point among the candidates)",
        KBestConfig,
        check_kbest_layer,
    ),
):
    register_method(
        Method(
            name=_name,
            config_cls=_config,
            quantize=_grid_method(_name),
            format="gptq",
            description=_description,
            check=_check,
        )
    )
