"""HPTQ and HRTN: one scale per matrix, unbounded integer codes, Huffman-coded (docs/theory.md §7).

``Q = s * Z`` with a single float16 scale ``s`` per weight matrix and integer codes ``Z`` that
are never clipped (so the Babai bound ``s^2/4 * tr(D)`` holds for GPTQ's codes). The codes are
stored as a canonical Huffman bitstream (:mod:`latticequant.formats.huffman`), row-major, with
its table and the bit offset of every chunk of ``chunk_rows`` rows (what lets the runtime decode
the stream tile by tile), in the layout of :mod:`latticequant.formats.hptq`.
``s`` is found by a safeguarded secant search on ``log2 s`` so that the stored size per weight,
the bitstream, the table, the chunk offsets, the scale and the shape all counted, lands in
``[target - tol, target]``. HPTQ rounds with GPTQ's error feedback, HRTN (the baseline) rounds
to nearest.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from latticequant.core.config import ORDER_NAMES, Order, QuantConfig
from latticequant.core.gptq import gptq_quantize
from latticequant.core.hessian import check_inputs
from latticequant.core.rtn import rtn_quantize
from latticequant.core.search import OutOfReach, meet_target
from latticequant.formats import huffman
from latticequant.formats.hptq import HPTQ
from latticequant.methods.registry import LayerContext, LayerQuant, Method, register_method

logger = logging.getLogger(__name__)

__all__ = [
    "HPTQConfig",
    "HRTNConfig",
    "HPTQResult",
    "UnreachableTargetError",
    "hptq_quantize",
    "hptq_tensors",
]

ROUNDINGS = ("gptq", "rtn")
_HEADER_BITS = 16 + 64 + 32  # the float16 scale, the int32 shape and the int32 chunk rows
_MAX_CODE = 1 << 20  # codes beyond +-2^20 are refused: the search would only chase noise
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24


class UnreachableTargetError(ValueError):
    """The target bits per weight cannot be met by any scale; names the closest reachable."""

    def __init__(self, target: float, closest: float, why: str) -> None:
        self.target, self.closest = target, closest
        super().__init__(
            f"target of {target:g} bits per weight cannot be reached ({why}); "
            f"the closest reachable is {closest:.4f} bits per weight"
        )


@dataclass(frozen=True)
class HPTQConfig:
    """HPTQ settings.

    target_bits: stored bits per weight to meet, everything counted (e.g. 2.125, 3.125, 4.125).
    tol: the search stops once the bits lie in ``[target_bits - tol, target_bits]``.
    max_iter: search steps at most; then the closest size not above the target is kept.
    rounding: "gptq" (HPTQ, error feedback in ``order``) or "rtn" (HRTN).
    max_code_length: longest Huffman code in bits (length-limited when needed).
    chunk_rows: output rows per independently decodable chunk of the stream; each chunk stores
        a 32-bit offset (counted in the bits), and more chunks decode faster in parallel.
    """

    target_bits: float = 3.125
    order: Order = "act"
    damp: float = 0.01
    block_size: int = 128
    tol: float = 0.01
    max_iter: int = 40
    rounding: str = "gptq"
    max_code_length: int = huffman.MAX_LENGTH
    chunk_rows: int = 1

    def __post_init__(self) -> None:
        t = self.target_bits
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 24:
            raise ValueError(f"target_bits must be a number in (0, 24], got {t!r}")
        if not isinstance(self.tol, (int, float)) or not 0 < self.tol < t:
            raise ValueError(f"tol must be positive and below target_bits, got {self.tol!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if isinstance(self.order, str) and self.order not in ORDER_NAMES:
            raise ValueError(f"order must be one of {ORDER_NAMES} or a permutation")
        m = self.max_code_length
        if not isinstance(m, int) or not 8 <= m <= 32:
            raise ValueError(f"max_code_length must be an integer from 8 to 32, got {m!r}")
        c = self.chunk_rows
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {c!r}")
        self.grid_config()  # validates damp, block_size and order tensors

    def grid_config(self) -> QuantConfig:
        """The core config: one group per row, unclipped (``bits`` only names a nominal grid)."""
        return QuantConfig(
            bits=8,
            group_size=-1,
            sym=True,
            order=self.order,
            clip=False,
            damp=self.damp,
            block_size=self.block_size,
        )


@dataclass(frozen=True)
class HRTNConfig(HPTQConfig):
    """HRTN: HPTQ's format and search with round-to-nearest codes."""

    rounding: str = "rtn"

    def __post_init__(self) -> None:
        if self.rounding != "rtn":
            raise ValueError(
                f"HRTN rounds to nearest: rounding must be 'rtn', not {self.rounding!r}"
            )
        super().__post_init__()


@dataclass
class HPTQResult:
    """One Huffman-coded layer. ``Q = scale * codes`` exactly as decoded from the stream."""

    codes: torch.Tensor  # int64, W's shape
    scale: float  # a float16 value
    table: huffman.HuffmanTable
    stream: np.ndarray  # uint8
    payload_bits: int  # bitstream length before byte padding
    Q: torch.Tensor
    loss: torch.Tensor
    bound: torch.Tensor
    order: torch.Tensor
    damp: float
    bits_per_weight: float
    iterations: int
    time_s: float = 0.0
    chunk_rows: int = 1  # rows per chunk of the stored chunk index

    @property
    def clipped(self) -> int:
        return 0


def _stored_bits(codes: torch.Tensor, cfg: HPTQConfig) -> tuple[int, huffman.HuffmanTable]:
    """Exact stored size of codes in bits (stream in whole bytes, table, chunk offsets, scale,
    shape)."""
    symbols, counts = huffman.symbol_counts(codes)
    table = huffman.table_from_counts(symbols, counts, cfg.max_code_length)
    payload = table.encoded_bits(symbols, counts)
    offsets = 32 * -(-codes.shape[0] // min(cfg.chunk_rows, codes.shape[0]))
    return 8 * math.ceil(payload / 8) + table.size_bits + offsets + _HEADER_BITS, table


def _fp16(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32).to(torch.float16))


class _Search:
    """Runs the core quantizer at one scale and measures the stored size (cached per scale)."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, cfg: HPTQConfig) -> None:
        self.W, self.H, self.cfg = W, H, cfg
        self.core = gptq_quantize if cfg.rounding == "gptq" else rtn_quantize
        self.grid = cfg.grid_config()
        self.n = W.numel()
        self.cache: dict[float, tuple] = {}

    def __call__(self, x: float):
        s = _fp16(2.0**x)
        if s not in self.cache:
            d_out = self.W.shape[0]
            scales = torch.full((d_out, 1), s, dtype=self.W.dtype, device=self.W.device)
            zeros = torch.zeros_like(scales)
            r = self.core(self.W, self.H, self.grid, scales=scales, zeros=zeros)
            if isinstance(self.grid.order, str) and self.grid.order != "natural":
                self.grid = self.grid.replace(order=r.order)  # resolve the order only once
            bits, table = _stored_bits(r.codes, self.cfg)
            self.cache[s] = (bits / self.n, (s, r, table))
            logger.debug("HPTQ scale %.6g: %.5f bits per weight", s, bits / self.n)
        return self.cache[s]


def _search_scale(W: torch.Tensor, H: torch.Tensor, cfg: HPTQConfig, reserved_bits: float = 0.0):
    """A secant search on ``log2 s``: the stored size falls by about a bit per doubling.

    ``reserved_bits``: bits per weight stored beside the method's tensors (a rotation's), taken
    out of the budget."""
    search = _Search(W, H, cfg)
    target, tol = cfg.target_bits - reserved_bits, cfg.tol
    wmax = float(W.abs().max()) or 1.0
    x_min = math.log2(max(_FP16_TINY, wmax / _MAX_CODE))
    x_max = math.log2(min(_FP16_MAX, 8 * wmax))  # every code 0 from here on (nearly, for GPTQ)
    # First guess: a Gaussian of W's spread needs h = log2(4.13 std / s) bits per weight.
    std = float(W.to(torch.float64).std()) or wmax
    x0 = math.log2(std) + 2.05 - target
    try:
        found = meet_target(
            search,
            x0,
            target,
            tol,
            slope=-1.0,
            x_min=x_min,
            x_max=x_max,
            max_iter=cfg.max_iter,
            x_tol=1e-4,
        )
    except OutOfReach as exc:
        if exc.point.value > target:
            why = "the scale is already 8 x max|W|, so (nearly) every code is 0"
        else:
            why = f"codes would exceed +-{_MAX_CODE} or the scale leave float16"
        raise UnreachableTargetError(target, exc.point.value, why) from None
    if not found.landed:
        logger.warning(
            "HPTQ size %.4f bits per weight is outside [%g, %g] after %d decodes; keeping the "
            "closest size not above the target",
            found.value,
            target - tol,
            target,
            found.evaluations,
        )
    s, r, table = found.payload
    return s, r, table, found.value, found.evaluations


def hptq_quantize(
    W: torch.Tensor, H: torch.Tensor, cfg: HPTQConfig, reserved_bits: float = 0.0
) -> HPTQResult:
    """Quantize W (d_out, d_in) to one scale and Huffman-coded unbounded codes; the stored size
    plus ``reserved_bits`` per weight meets the target."""
    if not isinstance(cfg, HPTQConfig):
        raise ValueError(f"hptq_quantize needs an HPTQConfig, got {type(cfg).__name__}")
    check_inputs(W, H)
    t0 = time.perf_counter()
    s, r, table, bpw, evals = _search_scale(W, H, cfg, reserved_bits)
    stream, payload = huffman.encode(r.codes, table)
    return HPTQResult(
        codes=r.codes,
        scale=s,
        table=table,
        stream=stream,
        payload_bits=payload,
        Q=r.Q,
        loss=r.loss,
        bound=r.bound,
        order=r.order,
        damp=r.damp,
        bits_per_weight=bpw,
        iterations=evals,
        time_s=time.perf_counter() - t0,
        chunk_rows=min(cfg.chunk_rows, W.shape[0]),
    )


def hptq_tensors(result: HPTQResult) -> dict[str, torch.Tensor]:
    """The stored tensors of one layer (the HPTQ format's packing)."""
    return HPTQ.pack(result)


def _layer(W: torch.Tensor, H: torch.Tensor, config: HPTQConfig, context: LayerContext | None):
    """The registered layer function of both HPTQ and HRTN."""
    context = context or LayerContext(HPTQ)
    result = hptq_quantize(W, H, config, context.reserved_bits)
    tensors = context.format.pack(result)
    bpw = context.format.effective_bits(tensors, W.numel())
    if abs(bpw - result.bits_per_weight) > 1e-12:
        raise AssertionError("HPTQ size accounting disagrees with the stored tensors")
    scales = torch.full((W.shape[0], 1), result.scale, dtype=W.dtype, device=W.device)
    grid = config.grid_config().replace(order=result.order)
    rtn = rtn_quantize(W, H, grid, scales=scales, zeros=torch.zeros_like(scales))
    symbols, counts = huffman.symbol_counts(result.codes)
    stats = {
        "loss": float(result.loss.sum()),
        "rtn_loss": float(rtn.loss.sum()),
        "bound": float(result.bound.sum()),
        "clipped": 0,
        "clipped_frac": 0.0,
        "outliers": 0,
        "scale_factor": result.scale,
        "n_symbols": int(symbols.size),
        "entropy_bits": huffman.entropy_bits(counts),
        "stream_bits_per_weight": 8 * result.stream.size / W.numel(),
        "table_bits": result.table.size_bits,
        "search_decodes": result.iterations,
        "damp": result.damp,
        "time_s": result.time_s,
        "bits_per_weight": bpw,
    }
    return LayerQuant(Q=result.Q, tensors=tensors, stats=stats)


def hptq_layer(
    W: torch.Tensor, H: torch.Tensor, config: HPTQConfig, context: LayerContext | None = None
):
    """HPTQ: GPTQ's codes (``config.rounding`` must be "gptq")."""
    if not isinstance(config, HPTQConfig) or config.rounding != "gptq":
        raise ValueError("method 'hptq' needs an HPTQConfig with rounding='gptq'")
    return _layer(W, H, config, context)


def hrtn_layer(
    W: torch.Tensor, H: torch.Tensor, config: HPTQConfig, context: LayerContext | None = None
):
    """HRTN: round-to-nearest codes in HPTQ's format."""
    if not isinstance(config, HPTQConfig) or config.rounding != "rtn":
        raise ValueError("method 'hrtn' needs an HRTNConfig (rounding='rtn')")
    return _layer(W, H, config, context)


register_method(
    Method(
        name="hptq",
        config_cls=HPTQConfig,
        quantize=hptq_layer,
        formats=("hptq",),
        description="one scale per matrix, unclipped GPTQ codes, Huffman-coded (HPTQ)",
    )
)
register_method(
    Method(
        name="hrtn",
        config_cls=HRTNConfig,
        quantize=hrtn_layer,
        formats=("hptq",),
        description="one scale per matrix, round-to-nearest codes, Huffman-coded (HRTN)",
    )
)
