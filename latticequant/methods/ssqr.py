"""SSQR: b-bit group codes plus sparse outliers, so nothing is ever clipped (docs/theory.md §7).

``W_hat = S * (Z - 2^(b-1)) + Xi``: symmetric b-bit codes with one 16-bit scale per group and a
CSR matrix ``Xi`` of outliers. The decode is GPTQ's (error feedback column by column, in the
processing order) with one change: when the error-updated weight ``t`` of a column would round
outside ``{0 .. 2^b - 1}``, it becomes an outlier. Its dense code is the zero point and ``Xi``
holds ``fp16(t)`` itself, so its rounding error is only float16's and what is propagated to
the remaining columns is that tiny error. Every step's error therefore stays within half a
grid step, and the Babai bound ``1/4 sum_j D_jj s_j^2`` holds (docs/theory.md §5).

The scales start from an MSE fit of the symmetric b-bit grid and are multiplied by one common
factor ``c``, found by a safeguarded secant search on ``log2 c`` so that the outlier rate
(outliers counted by the decode itself, error propagation included) meets the target. The
stored scales are the float16 values of ``c * s``; the decode runs on exactly those, so the
checkpoint dequantizes bit for bit to the weight the quantizer produced.

Why not substitute outliers after a plain unclipped GPTQ run: the later columns would then have
compensated an error that the stored weight no longer makes, and neither the bound nor
optimality of the remaining codes would hold.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from latticequant.core.config import ORDER_NAMES, SCALE_METHODS, Order, QuantConfig
from latticequant.core.gptq import gptq_decode, gptq_factor
from latticequant.core.grid import dequantize, fit_grid, group_index
from latticequant.core.hessian import check_inputs, prepare_diagonal
from latticequant.core.lattice import error_bound
from latticequant.core.order import check_permutation
from latticequant.core.result import row_losses
from latticequant.core.rtn import rtn_quantize
from latticequant.core.search import OutOfReach, meet_target
from latticequant.formats.ssqr import SSQR
from latticequant.methods.registry import LayerContext, LayerQuant, Method, register_method

logger = logging.getLogger(__name__)

__all__ = [
    "SSQRConfig",
    "SSQRResult",
    "ssqr_quantize",
    "ssqr_decode",
    "ssqr_tensors",
    "ssqr_layer",
]

SSQR_BITS = (2, 3, 4)
_FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)


@dataclass(frozen=True)
class SSQRConfig:
    """SSQR settings.

    bits: dense code width (2-4). group_size: input columns per 16-bit scale (-1: per row).
    outlier_rate: target fraction of weights stored as outliers (0 <= rate < 0.5).
    tol: the search stops once the rate lies in ``[outlier_rate - tol, outlier_rate]``.
    max_iter: search steps at most; the result then has the largest rate not above target.
    order: GPTQ processing order ("act", "min-pivot", "natural", "reverse" or a permutation).
    scale_method: fit of the base grid, "mse" (the paper's) or "minmax".
    """

    bits: int = 3
    group_size: int = 128
    outlier_rate: float = 0.01
    order: Order = "act"
    damp: float = 0.01
    scale_method: str = "mse"
    block_size: int = 128
    tol: float = 0.001
    max_iter: int = 40

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SSQR_BITS:
            raise ValueError(f"SSQR bits must be one of {SSQR_BITS}, got {self.bits!r}")
        rate = self.outlier_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 0.5:
            raise ValueError(f"outlier_rate must be a fraction in [0, 0.5), got {rate!r}")
        if not isinstance(self.tol, (int, float)) or not 0 <= self.tol <= max(rate, 0):
            raise ValueError(f"tol must lie in [0, outlier_rate] = [0, {rate}], got {self.tol!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if isinstance(self.order, str) and self.order not in ORDER_NAMES:
            raise ValueError(f"order must be one of {ORDER_NAMES} or a permutation")
        if self.scale_method not in SCALE_METHODS:
            raise ValueError(f"scale_method must be one of {SCALE_METHODS}")
        self.grid_config()  # validates group_size, damp, block_size, order tensors

    def grid_config(self) -> QuantConfig:
        """The core config of the dense part: symmetric, unclipped, static groups."""
        return QuantConfig(
            bits=self.bits,
            group_size=self.group_size,
            sym=True,
            order=self.order,
            clip=False,
            scale_method=self.scale_method,
            static_groups=True,
            damp=self.damp,
            block_size=self.block_size,
        )


@dataclass
class SSQRResult:
    """One SSQR layer, original column order.

    codes: dense codes in ``{0 .. 2^b - 1}`` (the zero point at outliers).
    scales: float16 scales ``(d_out, n_groups)`` (the common factor folded in).
    outliers: bool mask; values: the float16 outlier values (zero elsewhere).
    Q: ``scales * (codes - zero) + values`` in W's dtype: exactly what the checkpoint holds.
    loss / bound: per row, on the undamped / damped H as in :class:`~latticequant.QuantResult`.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    outliers: torch.Tensor
    values: torch.Tensor
    Q: torch.Tensor
    order: torch.Tensor
    loss: torch.Tensor
    bound: torch.Tensor
    D: torch.Tensor
    damp: float
    bits: int
    factor: float
    iterations: int
    time_s: float = 0.0

    @property
    def n_outliers(self) -> int:
        return int(self.outliers.sum())

    @property
    def outlier_rate(self) -> float:
        return self.n_outliers / self.codes.numel()

    @property
    def clipped(self) -> int:
        """Always 0: an overflowing weight becomes an outlier instead of being clamped."""
        return 0


@dataclass
class _Problem:
    """What every decode of one layer shares: the prepared weights and GPTQ's factor."""

    W: torch.Tensor  # prepared (dead columns zeroed)
    P: torch.Tensor
    U: torch.Tensor  # float64 upper factor of H_P^-1
    damp: float
    g_idx: torch.Tensor
    base_scales: torch.Tensor
    bits: int
    block_size: int


def _problem(W: torch.Tensor, H: torch.Tensor, cfg: SSQRConfig) -> _Problem:
    grid_cfg = cfg.grid_config()
    if isinstance(cfg.order, torch.Tensor):
        check_permutation(cfg.order, W.shape[1] if W.dim() == 2 else -1)
    Wp, h = prepare_diagonal(W, H)
    (P, U64), damp = gptq_factor(H, grid_cfg, h)
    base, _ = fit_grid(Wp, grid_cfg)
    return _Problem(
        W=Wp,
        P=P,
        U=U64,
        damp=damp,
        g_idx=group_index(W.shape[1], cfg.group_size).to(W.device),
        base_scales=base,
        bits=cfg.bits,
        block_size=cfg.block_size,
    )


def _fp16_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales rounded to float16 (what is stored), kept positive; a clear error on overflow."""
    half = scales.to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise ValueError("SSQR scales exceed the float16 range (weights too large)")
    return half.clamp(min=_FP16_TINY)


def ssqr_decode(
    W: torch.Tensor,
    P: torch.Tensor,
    U: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ with the outlier rule, blocked lazy-batch form: ``(codes, outliers, Q)``.

    ``U`` is the upper factor of ``H_P^-1`` in processing order ``P``; ``scales`` are used as
    given (already float16 values). A column whose error-updated weight ``t`` rounds outside
    ``{0 .. 2^b - 1}`` keeps ``q = fp16(t)`` and the zero point as its code; the core's
    :func:`~latticequant.gptq.gptq_decode` applies the rule inside its loop, so later columns
    correct only the error that is really stored.
    """
    d_in = W.shape[1]
    group_size = -1 if scales.shape[1] == 1 else int((g_idx == 0).sum())
    cfg = QuantConfig(
        bits=bits, group_size=group_size, sym=True, order=P, clip=False, block_size=block_size
    )
    if not torch.equal(g_idx.cpu(), group_index(d_in, group_size)):
        raise ValueError("SSQR groups must be the static groups j // group_size")
    S = scales.to(W.dtype)
    Z = torch.full_like(S, float(1 << (bits - 1)))
    dec = gptq_decode(W, P, U, cfg, S, Z, outlier_dtype=torch.float16)
    Q = torch.where(
        dec.outliers, dec.targets.to(torch.float16).to(W.dtype), dequantize(dec.codes, S, Z, g_idx)
    )
    if not bool(torch.isfinite(Q).all()):
        raise ValueError("an outlier exceeds the float16 range; SSQR cannot store it")
    return dec.codes.to(torch.int64), dec.outliers, Q


def _search_factor(prob: _Problem, cfg: SSQRConfig) -> tuple[float, tuple, int]:
    """The common factor ``c``: a secant search on ``log2 c`` for the outlier rate.

    The rate falls as the grid widens and its logarithm is nearly straight in ``log2 c``.
    Returns the factor, its decode ``(scales, codes, outliers, Q)`` and the number of decodes.
    """
    n = prob.W.numel()
    target, tol = cfg.outlier_rate, cfg.tol

    def evaluate(x: float):
        scales = _fp16_scales(prob.base_scales * 2.0**x)
        decoded = ssqr_decode(
            prob.W, prob.P, prob.U, scales, prob.g_idx, prob.bits, prob.block_size
        )
        rate = int(decoded[1].sum()) / n
        logger.debug("SSQR factor %.6g: outlier rate %.5f", 2.0**x, rate)
        return rate, (scales, *decoded)

    try:
        found = meet_target(
            evaluate,
            0.0,
            target,
            tol,
            slope=-4.0,
            x_min=-24.0,
            x_max=24.0,
            transform=lambda rate: math.log(rate + 0.5 / n),
            max_iter=cfg.max_iter,
            x_tol=1e-4,
            early_stop=target > 0,
        )
    except OutOfReach as exc:
        raise ValueError(
            f"SSQR cannot reach outlier rate {target}: the closest reachable is "
            f"{exc.point.value:.5f} (scale factor {2.0**exc.point.x:.3g})"
        ) from None
    if target > 0 and not found.landed:
        logger.warning(
            "SSQR outlier rate %.5f is outside [%g, %g] after %d decodes (the rate jumps "
            "there); keeping the largest rate not above the target",
            found.value,
            target - tol,
            target,
            found.evaluations,
        )
    return 2.0**found.x, found.payload, found.evaluations


def ssqr_quantize(W: torch.Tensor, H: torch.Tensor, cfg: SSQRConfig) -> SSQRResult:
    """Quantize W (d_out, d_in) with SSQR against the Hessian H (d_in, d_in)."""
    if not isinstance(cfg, SSQRConfig):
        raise ValueError(f"ssqr_quantize needs an SSQRConfig, got {type(cfg).__name__}")
    check_inputs(W, H)
    t0 = time.perf_counter()
    prob = _problem(W, H, cfg)
    factor, (scales16, codes, outliers, Q), evals = _search_factor(prob, cfg)
    Q = Q.to(W.dtype)
    loss = row_losses(W, H, Q)
    D = torch.empty(W.shape[1], dtype=torch.float64, device=W.device)
    D[prob.P] = 1.0 / torch.diagonal(prob.U) ** 2
    bound = error_bound(D, scales16, prob.g_idx).to(W.dtype)
    values = torch.where(outliers, Q, torch.zeros_like(Q)).to(torch.float16)
    zeros = torch.full(scales16.shape, float(1 << (cfg.bits - 1)), dtype=torch.float16)
    return SSQRResult(
        codes=codes,
        scales=scales16,
        zeros=zeros.to(scales16.device),
        g_idx=prob.g_idx,
        outliers=outliers,
        values=values,
        Q=Q,
        order=prob.P,
        loss=loss,
        bound=bound,
        D=D,
        damp=prob.damp,
        bits=cfg.bits,
        factor=factor,
        iterations=evals,
        time_s=time.perf_counter() - t0,
    )


def ssqr_tensors(result: SSQRResult) -> dict[str, torch.Tensor]:
    """The stored tensors of the SSQR format: GPTQ dense part plus CSR outliers in float16."""
    return SSQR.pack(result)


def ssqr_layer(
    W: torch.Tensor, H: torch.Tensor, config: SSQRConfig, context: LayerContext | None = None
):
    """The registered layer function: SSQR result, stored tensors and log entries."""
    fmt = (context or LayerContext(SSQR)).format
    result = ssqr_quantize(W, H, config)
    tensors = fmt.pack(result)
    rtn = rtn_quantize(W, H, config.grid_config().replace(clip=True, order=result.order))
    stats = {
        "loss": float(result.loss.sum()),
        "rtn_loss": float(rtn.loss.sum()),
        "bound": float(result.bound.sum()),
        "clipped": 0,
        "clipped_frac": 0.0,
        "outliers": result.n_outliers,
        "outlier_rate": result.outlier_rate,
        "scale_factor": result.factor,
        "search_decodes": result.iterations,
        "damp": result.damp,
        "time_s": result.time_s,
        "bits_per_weight": fmt.effective_bits(tensors, W.numel()),
    }
    return LayerQuant(Q=result.Q, tensors=tensors, stats=stats)


register_method(
    Method(
        name="ssqr",
        config_cls=SSQRConfig,
        quantize=ssqr_layer,
        formats=("ssqr",),
        description="b-bit groups + float16 CSR outliers, nothing clipped (SSQR)",
    )
)
