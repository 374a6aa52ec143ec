"""Bit packing shared by the GPTQ-layout formats: codes and zero points in int32 words.

Packing is one little-endian bit stream per packed line: code ``k`` occupies bits
``[k*b, (k+1)*b)`` of the stream and word ``w`` holds stream bits ``[32w, 32w+32)``. For 2, 4 and
8 bits no code crosses a word; for 3 bits every 32 codes fill exactly three words and codes 10 and
21 of each block straddle two words. This is the layout GPTQModel, AutoGPTQ and transformers read.

Zero points: ``checkpoint_format="gptq"`` (v1) stores ``z - 1`` in each field, the ecosystem's
historical convention; ``"gptq_v2"`` stores ``z`` as is. A v1 field cannot hold a zero point of 0
for every reader (readers that add one field by field get ``2^b``; for 2/4/8 bits the whole-word
subtraction also borrows from the neighbouring field), so :func:`pack_zeros` refuses it: the grid
methods keep v1 zero points in ``1 .. 2^b - 1`` (``QuantConfig.min_zero``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

WORD_BITS = 32
_CHUNK = 1 << 22  # elements per packing chunk: bounds the int64 temporaries on large layers


class FormatError(ValueError):
    """A tensor set does not match its format (missing key, wrong shape, dtype or value)."""


def check_bits(bits: int) -> None:
    """Refuse a code width that the GPTQ packing cannot store."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise FormatError(f"bits must be one of {SUPPORTED_BITS} for GPTQ packing, got {bits!r}")


def check_checkpoint_format(checkpoint_format: str) -> None:
    """Refuse a zero-point convention other than v1 (``gptq``) or v2 (``gptq_v2``)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise FormatError(
            f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}"
        )


def pack_granularity(bits: int) -> int:
    """Codes per whole group of words: 32 for 3 bits (3 words), ``32 / b`` otherwise (1 word)."""
    check_bits(bits)
    return WORD_BITS if bits == 3 else WORD_BITS // bits


def packed_size(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits."""
    check_bits(bits)
    return math.ceil(n * bits / WORD_BITS)


def _block_layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word (within a 32-code block of ``bits`` words) and shift of each of the 32 codes."""
    offset = torch.arange(WORD_BITS, device=device, dtype=torch.int64) * bits
    return offset // WORD_BITS, offset % WORD_BITS


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits - 1]`` into int32 words along ``dim``.

    Any length works: the last word is padded with zero bits, and ``unpack_codes`` needs the
    original length ``n``. Returns a contiguous int32 tensor with ``packed_size(n, bits)`` along
    ``dim``. Works on blocks of 32 codes, which fill exactly ``bits`` words.
    """
    check_bits(bits)
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
    n_words, n_blocks = packed_size(n, bits), -(-n // WORD_BITS)
    flat = c.reshape(n, -1)
    word, shift = _block_layout(bits, c.device)
    shift = shift[None, :, None]
    out = torch.empty(n_words, flat.shape[1], dtype=torch.int32, device=c.device)
    cols = max(1, _CHUNK // max(n, 1))
    for start in range(0, flat.shape[1], cols):
        block = flat[:, start : start + cols].to(torch.int64)
        if n_blocks * WORD_BITS != n:
            block = torch.cat([block, block.new_zeros(n_blocks * WORD_BITS - n, block.shape[1])])
        block = block.reshape(n_blocks, WORD_BITS, -1)
        words = torch.zeros(n_blocks, bits + 1, block.shape[2], dtype=torch.int64, device=c.device)
        # Fields never overlap, so adding the pieces is the same as OR-ing them.
        words.index_add_(1, word, (block << shift) & 0xFFFFFFFF)
        words.index_add_(1, word + 1, block >> (WORD_BITS - shift))  # high bits of straddlers
        out[:, start : start + cols] = _to_int32(words[:, :bits].reshape(-1, block.shape[2]))[
            :n_words
        ]
    return out.reshape(n_words, *rest).movedim(0, dim).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``n`` codes along ``dim``, as int64."""
    check_bits(bits)
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
    n_blocks = -(-n // WORD_BITS)
    word, shift = _block_layout(bits, p.device)
    shift = shift[None, :, None]
    maxq = (1 << bits) - 1
    out = torch.empty(n, flat.shape[1], dtype=torch.int64, device=p.device)
    cols = max(1, _CHUNK // max(n, 1))
    if bits != 3:  # whole codes in every word: one shift per position in the word
        per_word = WORD_BITS // bits
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
        high = nxt[:, word] << (WORD_BITS - shift)  # only straddling codes keep bits here
        out[:, start : start + cols] = ((low | high) & maxq).reshape(-1, block.shape[1])[:n]
    return out.reshape(n, *rest).movedim(0, dim).contiguous()


def integer_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
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


def check_divisible(n: int, bits: int, what: str) -> None:
    g = pack_granularity(bits)
    if n % g:
        raise FormatError(
            f"{what} = {n} is not a multiple of {g}, which {bits}-bit GPTQ packing requires; "
            "skip the layer (--skip) or use another bit width"
        )


def _ones_pattern(bits: int) -> int:
    """A 1 in every field of a word: what v1 subtracts from each word of zero points."""
    return sum(1 << (bits * i) for i in range(WORD_BITS // bits))


def pack_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """Pack zero points ``(G, d_out)`` into ``qzeros`` in the v1 or v2 convention.

    v1 subtracts one from every field, which needs every zero point in ``1 .. 2^b - 1``: a 0
    is refused, since readers that add one field by field would read ``2^b`` (and, for 2, 4 and
    8 bits, where the subtraction is done on the whole word as GPTQModel does, the borrow would
    change the neighbouring field for them too). With no 0, word-wise and field-wise agree.
    """
    if checkpoint_format == "gptq_v2":
        return pack_codes(zeros, bits, dim=1)
    if zeros.numel() and bool((zeros == 0).any()):
        raise FormatError(
            "a zero point of 0 cannot be stored in a v1 ('gptq') checkpoint, which readers "
            "take as 2^bits; write checkpoint_format='gptq_v2' or fit the grid with min_zero=1"
        )
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


def require_tensor(tensors: Mapping[str, torch.Tensor], key: str, dtypes: tuple, ndim: int):
    """``tensors[key]``, checked to be a tensor of one of ``dtypes`` with ``ndim`` dimensions."""
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
