"""The grid methods ``rtn``, ``gptq``, ``babai`` and ``kbest``: the core's quantizers on a b-bit
grid, stored in a grid format (GPTQ v1 or v2).

Each layer is solved in float64 (the layers are small enough that it costs little, and the two
derivations, GPTQ and Babai, then round every weight the same way, ties included), on the grid its
format can hold (:meth:`Format.min_zero`), packed by the format and fed forward exactly as the
format dequantizes it (scales rounded to float16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from latticequant.core.babai import babai_quantize
from latticequant.core.config import QuantConfig
from latticequant.core.gptq import gptq_quantize
from latticequant.core.kbest import kbest_quantize
from latticequant.core.refine import refine
from latticequant.core.result import QuantResult
from latticequant.core.rtn import rtn_loss, rtn_quantize
from latticequant.formats.gptq import GPTQ_V1
from latticequant.methods.registry import (
    LayerContext,
    LayerQuant,
    Method,
    UnsupportedConfigError,
    register_method,
)

__all__ = [
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
    W: torch.Tensor, H: torch.Tensor, cfg: KBestConfig, min_zero: int = 0, **grid
) -> QuantResult:
    return kbest_quantize(
        W,
        H,
        cfg,
        beam=cfg.beam,
        klein_paths=cfg.klein_paths,
        seed=cfg.seed,
        min_zero=min_zero,
        **grid,
    )


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


def _grid_method(name: str) -> Callable[[torch.Tensor, torch.Tensor, QuantConfig], LayerQuant]:
    core = CORE_QUANTIZERS[name]

    def quantize(
        W: torch.Tensor, H: torch.Tensor, config: QuantConfig, context: LayerContext | None = None
    ) -> LayerQuant:
        fmt = (context or LayerContext(GPTQ_V1)).format
        min_zero = fmt.min_zero(config)  # what the format's zero points can hold
        # W in float64; H as given: every core function takes its own float64 copy, and a
        # second one here would be 1.6 GB at Llama-3-8B's down_proj
        W64 = W.to(torch.float64)
        # a format with its own scale choice (GGUF) fixes the grid; the method decodes on it
        fixed = fmt.layer_grid(W64, H, config, context.name if context else "")
        grid: dict = {}
        if fixed is not None:
            config = fixed.config
            grid = {"scales": fixed.scales, "zeros": fixed.zeros, "integer_zeros": False}
        result = core(W64, H, config, min_zero=min_zero, **grid)
        integer = fixed is None
        base = (
            result.proxy_loss
            if name == "rtn"
            else _rtn_baseline(W64, H, config, result, min_zero, integer)
        )
        extra: dict[str, float] = {}
        if name != "gptq" or config.refine_steps:  # GPTQ's loss, to read this one against
            extra["gptq_loss"] = gptq_quantize(W64, H, config, min_zero=min_zero, **grid).proxy_loss
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
                min_zero=min_zero,
            )
            extra.update(refined)
        del W64  # 470 MB at 4096 x 14336, before the packing's and Q's own buffers
        tensors = fmt.pack(result) if fixed is None else fixed.pack(result)
        Q = fmt.dequantize(tensors, {"bits": config.bits}, W.dtype)  # as a loader reads it
        stats = grid_layer_stats(result, base)
        stats.update(extra)
        stats["bits_per_weight"] = fmt.effective_bits(tensors, W.numel())
        return LayerQuant(Q=Q, tensors=tensors, stats=stats)

    quantize.__name__ = f"{name}_layer"
    quantize.__doc__ = f"One layer by ``latticequant.{name}_quantize``, in the context's format."
    return quantize


GRID_FORMATS = ("gptq", "gptq_v2", "gguf")

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
    register_method(
        Method(
            name=_name,
            config_cls=_config,
            quantize=_grid_method(_name),
            formats=GRID_FORMATS,
            description=_description,
            **({"check": _check} if _check else {}),
        )
    )
