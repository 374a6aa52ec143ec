"""Checkpoint tensor formats: the GPTQ layout the ecosystem loads, and SSQR (GPTQ + CSR outliers).

GPTQ layout of one linear layer (``W`` is ``(d_out, d_in)``, ``b`` bits, ``G`` groups):

- ``qweight`` int32 ``(d_in * b / 32, d_out)``: codes packed along the input dimension;
- ``qzeros``  int32 ``(G, d_out * b / 32)``: zero points packed along the output dimension;
- ``scales``  float16 ``(G, d_out)``;
- ``g_idx``   int32 ``(d_in,)``: group of each input column (any order: act-order included).

Packing is one little-endian bit stream per packed line: code ``k`` occupies bits
``[k*b, (k+1)*b)`` of the stream and word ``w`` holds stream bits ``[32w, 32w+32)``. For 2, 4 and
8 bits no code crosses a word; for 3 bits every 32 codes fill exactly three words and codes 10 and
21 of each block straddle two words. This is the layout GPTQModel, AutoGPTQ and transformers read.

Zero points: ``checkpoint_format="gptq"`` (v1) stores ``z - 1`` in each field, the ecosystem's
historical convention; ``"gptq_v2"`` stores ``z`` as is. v1 cannot hold a zero point of 0 for
every loader: we subtract the ones on whole words for 2/4/8 bits and field by field for 3 bits,
exactly as GPTQModel converts v1 back to v2, so GPTQModel reads it exactly; loaders that add one
field by field read such a field (and, for 2/4/8 bits, its neighbour) wrong. Packing a zero point
of 0 as v1 therefore logs a warning; symmetric grids (``z = 2^(b-1)``) never have one.

Scales are stored in float16: a weight dequantized from the file equals the in-memory ``Q`` only up
to the float16 rounding of the scales; it equals ``fp16(scales) * (codes - zeros)`` exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
SSQR_KEYS = GPTQ_KEYS + ("outlier_rowptr", "outlier_col", "outlier_val")

_WORD = 32
_CHUNK = 1 << 22  # elements per packing chunk: bounds the int64 temporaries on large layers


class FormatError(ValueError):
    """A tensor set does not match its format (missing key, wrong shape, dtype or value)."""


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise FormatError(f"bits must be one of {SUPPORTED_BITS} for GPTQ packing, got {bits!r}")


def _check_checkpoint_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise FormatError(
            f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}"
        )


def pack_granularity(bits: int) -> int:
    """Codes per whole group of words: 32 for 3 bits (3 words), ``32 / b`` otherwise (1 word)."""
    _check_bits(bits)
    return _WORD if bits == 3 else _WORD // bits


def packed_size(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits."""
    _check_bits(bits)
    return math.ceil(n * bits / _WORD)


def _block_layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word (within a 32-code block of ``bits`` words) and shift of each of the 32 codes."""
    offset = torch.arange(_WORD, device=device, dtype=torch.int64) * bits
    return offset // _WORD, offset % _WORD


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits - 1]`` into int32 words along ``dim``.

    Any length works: the last word is padded with zero bits, and ``unpack_codes`` needs the
    original length ``n``. Returns a contiguous int32 tensor with ``packed_size(n, bits)`` along
    ``dim``. Works on blocks of 32 codes, which fill exactly ``bits`` words.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise FormatError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise FormatError("codes must have at least one dimension")
    dim = dim % codes.dim()
    c = codes.movedim(dim, 0)
    maxq = (1 << bits) - 1
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > maxq):
        raise FormatError(
            f"codes must lie in [0, {maxq}] to be packed in {bits} bits, found values in "
            f"[{int(c.min())}, {int(c.max())}]"
        )
    n, rest = c.shape[0], c.shape[1:]
    n_words, n_blocks = packed_size(n, bits), -(-n // _WORD)
    flat = c.reshape(n, -1)
    word, shift = _block_layout(bits, c.device)
    shift = shift[None, :, None]
    out = torch.empty(n_words, flat.shape[1], dtype=torch.int32, device=c.device)
    cols = max(1, _CHUNK // max(n, 1))
    for start in range(0, flat.shape[1], cols):
        block = flat[:, start : start + cols].to(torch.int64)
        if n_blocks * _WORD != n:
            block = torch.cat([block, block.new_zeros(n_blocks * _WORD - n, block.shape[1])])
        block = block.reshape(n_blocks, _WORD, -1)
        words = torch.zeros(n_blocks, bits + 1, block.shape[2], dtype=torch.int64, device=c.device)
        # Fields never overlap, so adding the pieces is the same as OR-ing them.
        words.index_add_(1, word, (block << shift) & 0xFFFFFFFF)
        words.index_add_(1, word + 1, block >> (_WORD - shift))  # high bits of straddlers
        out[:, start : start + cols] = _to_int32(words[:, :bits].reshape(-1, block.shape[2]))[
            :n_words
        ]
    return out.reshape(n_words, *rest).movedim(0, dim).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``n`` codes along ``dim``, as int64."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise FormatError(f"packed codes must be int32, got {packed.dtype}")
    if packed.dim() == 0:
        raise FormatError("packed codes must have at least one dimension")
    dim = dim % packed.dim()
    p = packed.movedim(dim, 0)
    need = packed_size(n, bits)
    if p.shape[0] < need:
        raise FormatError(
            f"{n} codes of {bits} bits need {need} words along dim {dim}, got {p.shape[0]}"
        )
    rest = p.shape[1:]
    flat = p[:need].reshape(need, -1)
    n_blocks = -(-n // _WORD)
    word, shift = _block_layout(bits, p.device)
    shift = shift[None, :, None]
    maxq = (1 << bits) - 1
    out = torch.empty(n, flat.shape[1], dtype=torch.int64, device=p.device)
    cols = max(1, _CHUNK // max(n, 1))
    if bits != 3:  # whole codes in every word: one shift per position in the word
        per_word = _WORD // bits
        shifts = torch.arange(per_word, device=p.device, dtype=torch.int64)[None, :, None] * bits
        for start in range(0, flat.shape[1], cols):
            block = flat[:, start : start + cols].to(torch.int64)
            codes = (block[:, None, :] >> shifts) & maxq
            out[:, start : start + cols] = codes.reshape(-1, block.shape[1])[:n]
        return out.reshape(n, *rest).movedim(0, dim).contiguous()
    for start in range(0, flat.shape[1], cols):
        block = flat[:, start : start + cols].to(torch.int64) & 0xFFFFFFFF
        pad = n_blocks * bits + 1 - need  # whole blocks, plus one word for the last straddler
        block = torch.cat([block, block.new_zeros(pad, block.shape[1])])
        blocks = block[: n_blocks * bits].reshape(n_blocks, bits, -1)
        nxt = block[1 : n_blocks * bits + 1].reshape(n_blocks, bits, -1)
        low = blocks[:, word] >> shift
        high = nxt[:, word] << (_WORD - shift)  # only straddling codes keep bits here
        out[:, start : start + cols] = ((low | high) & maxq).reshape(-1, block.shape[1])[:n]
    return out.reshape(n, *rest).movedim(0, dim).contiguous()


def _integer_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    """Integer-valued (possibly float) tensor -> int64, refusing non-integers and non-finite."""
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()):
            raise FormatError(f"{name} contains non-finite values")
        r = torch.round(t)
        if not bool((r == t).all()):
            raise FormatError(f"{name} must be integer-valued")
        return r.to(torch.int64)
    if t.is_complex() or t.dtype == torch.bool:
        raise FormatError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.to(torch.int64)


def _check_divisible(n: int, bits: int, what: str) -> None:
    g = pack_granularity(bits)
    if n % g:
        raise FormatError(
            f"{what} = {n} is not a multiple of {g}, which {bits}-bit GPTQ packing requires; "
            f"leave this layer unquantized or use another format"
        )


def _ones_pattern(bits: int) -> int:
    """A 1 in every field of a word: what v1 subtracts from each word of zero points."""
    return sum(1 << (bits * i) for i in range(_WORD // bits))


def pack_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """Pack zero points ``(G, d_out)`` into ``qzeros`` in the v1 or v2 convention.

    v1 subtracts one from every field. For 2, 4 and 8 bits the subtraction is done on the
    whole 32-bit word, as GPTQModel does (and undoes by adding the word back), so a zero point
    of 0 borrows from its neighbour and still reads back exactly there; for 3 bits, whose fields
    cross words, it is done field by field (mod 2^b), again as GPTQModel reads it.
    """
    if checkpoint_format == "gptq_v2":
        return pack_codes(zeros, bits, dim=1)
    if bits == 3:
        return pack_codes((zeros - 1) & 7, bits, dim=1)
    words = pack_codes(zeros, bits, dim=1).to(torch.int64) & 0xFFFFFFFF
    return _to_int32((words - _ones_pattern(bits)) & 0xFFFFFFFF)


def unpack_zeros(
    qzeros: torch.Tensor, bits: int, d_out: int, checkpoint_format: str
) -> torch.Tensor:
    """Inverse of ``pack_zeros``: int64 zero points ``(G, d_out)``."""
    if checkpoint_format == "gptq_v2":
        return unpack_codes(qzeros, bits, d_out, dim=1)
    if bits == 3:
        return (unpack_codes(qzeros, bits, d_out, dim=1) + 1) & 7
    words = (qzeros.to(torch.int64) + _ones_pattern(bits)) & 0xFFFFFFFF
    return unpack_codes(_to_int32(words), bits, d_out, dim=1)


def pack_gptq_parts(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Pack codes ``(d_out, d_in)``, scales/zeros ``(d_out, G)`` and ``g_idx`` ``(d_in,)``."""
    _check_bits(bits)
    _check_checkpoint_format(checkpoint_format)
    if codes.dim() != 2:
        raise FormatError(f"codes must be 2-D (d_out, d_in), got shape {tuple(codes.shape)}")
    d_out, d_in = codes.shape
    _check_divisible(d_in, bits, "d_in (input features)")
    _check_divisible(d_out, bits, "d_out (output features)")
    if scales.dim() != 2 or scales.shape[0] != d_out:
        raise FormatError(f"scales must be (d_out={d_out}, n_groups), got {tuple(scales.shape)}")
    if zeros.shape != scales.shape:
        raise FormatError(
            f"zeros must have the shape of scales {tuple(scales.shape)}, got {tuple(zeros.shape)}"
        )
    if not scales.is_floating_point() or not bool(torch.isfinite(scales).all()):
        raise FormatError("scales must be finite floating-point values")
    if scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise FormatError(f"scale_dtype must be float16, bfloat16 or float32, got {scale_dtype}")
    if scales.numel() and float(scales.abs().max()) > torch.finfo(scale_dtype).max:
        raise FormatError(f"scales exceed the range of {scale_dtype}")
    n_groups = scales.shape[1]
    g = _integer_tensor(g_idx, "g_idx")
    if g.shape != (d_in,):
        raise FormatError(f"g_idx must have shape ({d_in},), got {tuple(g_idx.shape)}")
    if d_in and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise FormatError(f"g_idx values must lie in [0, {n_groups}) (the number of groups)")
    c = _integer_tensor(codes, "codes")
    maxq = (1 << bits) - 1
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > maxq):
        raise FormatError(
            f"codes leave the {bits}-bit grid [0, {maxq}] (an unclipped result?): the GPTQ "
            f"format cannot store them; use a format with outliers such as ssqr"
        )
    z = _integer_tensor(zeros, "zeros")
    if z.numel() and (int(z.min()) < 0 or int(z.max()) > maxq):
        raise FormatError(f"zero points must lie in [0, {maxq}]")
    if checkpoint_format == "gptq" and bool((z == 0).any()):
        logger.warning(
            "zero point 0 in a v1 ('gptq') checkpoint: GPTQModel reads it back exactly, loaders "
            "that add one field by field do not; checkpoint_format='gptq_v2' is unambiguous"
        )
    return {
        "qweight": pack_codes(c.t(), bits, dim=0),
        "qzeros": pack_zeros(z.t(), bits, checkpoint_format),
        "scales": scales.t().to(scale_dtype).contiguous(),
        "g_idx": g.to(torch.int32).contiguous(),
    }


def pack_gptq(
    result, checkpoint_format: str = "gptq", scale_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """Pack a ``QuantResult`` into the GPTQ tensors ``qweight/qzeros/scales/g_idx``.

    Raises ``FormatError`` when a dimension does not fit the packing (the pipeline then keeps
    the layer in float) or when codes leave the b-bit grid (unclipped results).
    """
    return pack_gptq_parts(
        result.codes,
        result.scales,
        result.zeros,
        result.g_idx,
        int(result.bits),
        checkpoint_format=checkpoint_format,
        scale_dtype=scale_dtype,
    )


@dataclass(frozen=True)
class GPTQShape:
    """Dimensions of a validated GPTQ tensor set."""

    d_in: int
    d_out: int
    n_groups: int


def _require(tensors: Mapping[str, torch.Tensor], key: str, dtypes: tuple, ndim: int):
    if key not in tensors:
        raise FormatError(f"missing tensor {key!r} (have {sorted(tensors)})")
    t = tensors[key]
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{key!r} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise FormatError(f"{key!r} has dtype {t.dtype}, expected one of {list(dtypes)}")
    if t.dim() != ndim:
        raise FormatError(f"{key!r} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def validate_gptq(tensors: Mapping[str, torch.Tensor], bits: int) -> GPTQShape:
    """Check keys, dtypes and shapes of a GPTQ tensor set; name the key at fault."""
    _check_bits(bits)
    qweight = _require(tensors, "qweight", (torch.int32,), 2)
    qzeros = _require(tensors, "qzeros", (torch.int32,), 2)
    scales = _require(tensors, "scales", (torch.float16, torch.bfloat16, torch.float32), 2)
    g_idx = _require(tensors, "g_idx", (torch.int32, torch.int64), 1)
    rows, d_out = qweight.shape
    if (rows * _WORD) % bits or ((rows * _WORD) // bits) % pack_granularity(bits):
        raise FormatError(f"'qweight' has {rows} rows, not a whole number of {bits}-bit blocks")
    d_in = rows * _WORD // bits
    n_groups = scales.shape[0]
    if scales.shape != (n_groups, d_out) or n_groups == 0:
        raise FormatError(f"'scales' must be (n_groups, {d_out}), got {tuple(scales.shape)}")
    if d_out % pack_granularity(bits):
        raise FormatError(f"'qweight' has {d_out} columns, not packable in {bits} bits along d_out")
    if qzeros.shape != (n_groups, d_out * bits // _WORD):
        raise FormatError(
            f"'qzeros' must be ({n_groups}, {d_out * bits // _WORD}), got {tuple(qzeros.shape)}"
        )
    if g_idx.shape != (d_in,):
        raise FormatError(
            f"'qweight' {tuple(qweight.shape)} holds {d_in} input rows at {bits} bits but "
            f"'g_idx' has {g_idx.shape[0]} entries (truncated or mismatched tensors)"
        )
    if d_in and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise FormatError(f"'g_idx' values must lie in [0, {n_groups})")
    return GPTQShape(d_in=d_in, d_out=d_out, n_groups=n_groups)


def unpack_gptq(
    tensors: Mapping[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_gptq``: ``(codes, scales, zeros, g_idx)`` in ``QuantResult`` layout.

    codes int64 ``(d_out, d_in)``; scales ``(d_out, G)`` in the stored dtype; zeros int64
    ``(d_out, G)``; g_idx int64 ``(d_in,)``.
    """
    _check_checkpoint_format(checkpoint_format)
    shape = validate_gptq(tensors, bits)
    codes = unpack_codes(tensors["qweight"], bits, shape.d_in, dim=0).t().contiguous()
    zeros = unpack_zeros(tensors["qzeros"], bits, shape.d_out, checkpoint_format).t().contiguous()
    scales = tensors["scales"].t().contiguous()
    return codes, scales, zeros, tensors["g_idx"].to(torch.int64)


def dequantize_gptq(
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W (d_out, d_in) = scales[:, g_idx] * (codes - zeros[:, g_idx])`` computed in ``dtype``.

    Equals the quantizer's ``Q`` up to the rounding of the scales to the stored dtype.
    """
    codes, scales, zeros, g_idx = unpack_gptq(tensors, bits, checkpoint_format)
    return scales.to(dtype)[:, g_idx] * (codes.to(dtype) - zeros.to(dtype)[:, g_idx])


# ----------------------------------------------------------------------------------------------
# SSQR: GPTQ dense part + CSR outliers.


def pack_csr(
    mask: torch.Tensor, values: torch.Tensor, value_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """CSR of the entries of ``values`` (d_out, d_in) where ``mask`` is set, row-major order.

    ``outlier_col`` is int16 when ``d_in < 32768`` (indices fit) and int32 otherwise.
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise FormatError("outlier mask must be a 2-D bool tensor (d_out, d_in)")
    if values.shape != mask.shape:
        raise FormatError(
            f"outlier values {tuple(values.shape)} must match the mask {tuple(mask.shape)}"
        )
    d_out, d_in = mask.shape
    rows, cols = mask.nonzero(as_tuple=True)  # row-major, columns ascending within a row
    val = values[rows, cols]
    if val.numel() and not bool(torch.isfinite(val).all()):
        raise FormatError("outlier values must be finite")
    if val.numel() and float(val.abs().max()) > torch.finfo(value_dtype).max:
        raise FormatError(f"outlier values exceed the range of {value_dtype}")
    counts = torch.bincount(rows, minlength=d_out)
    rowptr = torch.zeros(d_out + 1, dtype=torch.int64)
    rowptr[1:] = torch.cumsum(counts.cpu(), 0)
    if int(rowptr[-1]) >= 1 << 31:
        raise FormatError("too many outliers for int32 row pointers")
    col_dtype = torch.int16 if d_in < 32768 else torch.int32
    return {
        "outlier_rowptr": rowptr.to(torch.int32),
        "outlier_col": cols.to(col_dtype).cpu().contiguous(),
        "outlier_val": val.to(value_dtype).cpu().contiguous(),
    }


def pack_ssqr(
    result,
    outlier_mask: torch.Tensor,
    outlier_values: torch.Tensor,
    checkpoint_format: str = "gptq",
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Pack an SSQR layer: the dense GPTQ part plus CSR outliers.

    At each outlier the dense code is set to the zero point (it contributes 0) and the CSR value
    is the whole weight, taken from ``outlier_values`` (d_out, d_in). Codes elsewhere must lie on
    the b-bit grid.
    """
    bits = int(result.bits)
    codes = _integer_tensor(result.codes, "codes")
    if outlier_mask.shape != codes.shape:
        raise FormatError(
            f"outlier mask {tuple(outlier_mask.shape)} must match codes {tuple(codes.shape)}"
        )
    g = _integer_tensor(result.g_idx, "g_idx")
    zero_at = _integer_tensor(result.zeros, "zeros")[:, g]
    codes = torch.where(outlier_mask, zero_at, codes)
    tensors = pack_gptq_parts(
        codes, result.scales, result.zeros, g, bits, checkpoint_format, scale_dtype
    )
    tensors.update(pack_csr(outlier_mask, outlier_values))
    return tensors


def validate_csr(tensors: Mapping[str, torch.Tensor], d_out: int, d_in: int) -> int:
    """Check the CSR outlier tensors; return the number of outliers."""
    rowptr = _require(tensors, "outlier_rowptr", (torch.int32, torch.int64), 1)
    col = _require(tensors, "outlier_col", (torch.int16, torch.int32, torch.int64), 1)
    val = _require(tensors, "outlier_val", (torch.float16, torch.bfloat16, torch.float32), 1)
    if rowptr.shape != (d_out + 1,):
        raise FormatError(f"'outlier_rowptr' must have shape ({d_out + 1},), got {rowptr.shape}")
    nnz = int(rowptr[-1])
    if int(rowptr[0]) != 0 or bool((rowptr[1:] < rowptr[:-1]).any()):
        raise FormatError("'outlier_rowptr' must start at 0 and be non-decreasing")
    if col.shape != (nnz,) or val.shape != (nnz,):
        raise FormatError(
            f"'outlier_col' and 'outlier_val' must have {nnz} entries (outlier_rowptr[-1]), "
            f"got {tuple(col.shape)} and {tuple(val.shape)}"
        )
    if nnz and (int(col.min()) < 0 or int(col.max()) >= d_in):
        raise FormatError(f"'outlier_col' values must lie in [0, {d_in})")
    return nnz


def csr_to_dense(
    tensors: Mapping[str, torch.Tensor], d_out: int, d_in: int, dtype: torch.dtype
) -> torch.Tensor:
    """The outlier matrix ``(d_out, d_in)`` as a dense tensor of ``dtype``."""
    validate_csr(tensors, d_out, d_in)
    rowptr = tensors["outlier_rowptr"].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(d_out), rowptr[1:] - rowptr[:-1])
    dense = torch.zeros(d_out, d_in, dtype=dtype)
    dense[rows, tensors["outlier_col"].to(torch.int64)] = tensors["outlier_val"].to(dtype)
    return dense


def dequantize_ssqr(
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W_hat = dense + CSR`` in ``dtype`` (dense part as in ``dequantize_gptq``)."""
    dense = dequantize_gptq(tensors, bits, checkpoint_format, dtype)
    return dense + csr_to_dense(tensors, dense.shape[0], dense.shape[1], dtype)


# ----------------------------------------------------------------------------------------------
# quantize_config.json and the module registry used by the checkpoint loader.


def quantize_config_dict(
    *,
    bits: int,
    group_size: int,
    desc_act: bool = False,
    sym: bool = True,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    checkpoint_format: str = "gptq",
    lm_head: bool = False,
    meta: Mapping | None = None,
) -> dict:
    """The ``quantize_config.json`` dict (also ``config.json``'s ``quantization_config``).

    Key names follow what GPTQModel writes and transformers' ``GPTQConfig`` reads:
    ``checkpoint_format`` and its newer alias ``format``; the quantizer's own settings
    (damping, static groups, method details) are repeated under ``meta``.
    """
    _check_bits(bits)
    _check_checkpoint_format(checkpoint_format)
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise FormatError(f"group_size must be -1 or a positive integer, got {group_size!r}")
    from latticequant import __version__

    meta_out = {
        "quantizer": [f"latticequant:{__version__}"],
        "damp_percent": damp_percent,
        "static_groups": bool(static_groups),
        "true_sequential": bool(true_sequential),
    }
    meta_out.update(dict(meta or {}))
    out = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": bool(desc_act),
        "sym": bool(sym),
        "lm_head": bool(lm_head),
        "static_groups": bool(static_groups),
        "true_sequential": bool(true_sequential),
        "act_group_aware": False,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": meta_out,
    }
    # transformers refuses damp_percent outside (0, 1); the exact value stays in meta.
    if 0 < damp_percent < 1:
        out["damp_percent"] = damp_percent
    return out


Builder = Callable[[Mapping[str, torch.Tensor], Mapping, "torch.Tensor | None"], nn.Module]


@dataclass(frozen=True)
class ModuleFormat:
    """How the loader turns one layer's stored tensors into a module."""

    name: str
    keys: tuple[str, ...]
    build: Builder


_FORMATS: dict[str, ModuleFormat] = {}


def register_format(fmt: ModuleFormat) -> None:
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt


def get_format(name: str) -> ModuleFormat:
    """The registered module format ``name``; methods' modules register theirs on import."""
    if name not in _FORMATS:
        from latticequant.methods import list_methods

        list_methods()  # imports the optional method modules, which register their formats
    if name not in _FORMATS:
        raise FormatError(f"unknown module format {name!r}; known: {sorted(_FORMATS)}")
    return _FORMATS[name]


def format_names() -> tuple[str, ...]:
    return tuple(sorted(_FORMATS))


def _meta_bits_format(meta: Mapping) -> tuple[int, str]:
    try:
        bits = int(meta["bits"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"module meta must give an integer 'bits', got {meta!r}") from None
    _check_bits(bits)
    fmt = str(meta.get("checkpoint_format", "gptq"))
    _check_checkpoint_format(fmt)
    return bits, fmt


def _check_meta_dims(meta: Mapping, d_in: int, d_out: int) -> None:
    for key, have in (("in_features", d_in), ("out_features", d_out)):
        if key in meta and int(meta[key]) != have:
            raise FormatError(f"stored tensors give {key}={have}, expected {int(meta[key])}")


def _module_options(meta: Mapping) -> dict:
    return {
        "backend": str(meta.get("backend", "auto")),
        "cache_weight": meta.get("cache_weight"),
    }


def _build_gptq(tensors, meta, bias=None) -> nn.Module:
    from latticequant.qlinear import QuantLinear

    bits, fmt = _meta_bits_format(meta)
    module = QuantLinear.from_tensors(
        tensors, bits, checkpoint_format=fmt, bias=bias, **_module_options(meta)
    )
    _check_meta_dims(meta, module.in_features, module.out_features)
    return module


def _build_ssqr(tensors, meta, bias=None) -> nn.Module:
    from latticequant.qlinear import SSQRLinear

    bits, fmt = _meta_bits_format(meta)
    module = SSQRLinear.from_tensors(
        tensors, bits, checkpoint_format=fmt, bias=bias, **_module_options(meta)
    )
    _check_meta_dims(meta, module.in_features, module.out_features)
    return module


register_format(ModuleFormat("gptq", GPTQ_KEYS, _build_gptq))
register_format(ModuleFormat("ssqr", SSQR_KEYS, _build_ssqr))


def build_module(
    format_name: str,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping,
    bias: torch.Tensor | None = None,
) -> nn.Module:
    """Build the inference module of one layer from its stored tensors (keys without prefix).

    ``meta`` holds at least ``bits``; optionally ``checkpoint_format`` (default ``"gptq"``),
    ``in_features``/``out_features`` (checked against the tensors), ``backend``
    ("auto" | "torch" | "triton") and ``cache_weight`` (see ``QuantLinear``).
    """
    fmt = get_format(format_name)
    missing = [k for k in fmt.keys if k not in tensors]
    if missing:
        raise FormatError(f"format {format_name!r}: missing tensor(s) {missing}")
    return fmt.build(tensors, meta, bias)
