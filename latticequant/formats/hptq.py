"""The HPTQ tensor layout: a canonical Huffman bitstream of integer codes, cut into chunks.

Stored tensors (keys without the module prefix): ``hptq_stream`` uint8 (the bitstream, padded
to a byte), ``hptq_table`` uint8 (the serialised code table), ``hptq_scale`` float16 (1,),
``hptq_shape`` int32 (2,), and the chunk index: ``hptq_chunk_rows`` int32 (1,) and
``hptq_offsets`` int32 ``(ceil(d_out / chunk_rows),)``, the bit at which each chunk of
``chunk_rows`` output rows starts. ``W = scale * codes``.

The codes are written row-major as one stream, so the chunks cost no padding: the offsets are
where the rows' codes happen to start, and what makes each chunk decodable on its own. They are
stored (and counted in the effective bits) so that :class:`HuffmanLinear` can decode the stream
tile by tile in every forward call and keep only the compressed bytes resident. Files written
before the chunk index existed hold the first four tensors only; they load, and the index is
found by decoding the stream once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from latticequant.formats import huffman, kernels
from latticequant.formats.bits import effective_bits
from latticequant.formats.dispatch import BACKENDS, DispatchedLinear
from latticequant.formats.packing import FormatError
from latticequant.formats.protocol import Format, register_format

__all__ = [
    "HPTQ_KEYS",
    "HPTQ_CHUNK_KEYS",
    "TILE_ROWS",
    "HPTQLayout",
    "validate_hptq",
    "chunk_index",
    "decode_hptq",
    "dequantize_hptq",
    "HuffmanLinear",
    "build_hptq_module",
]

HPTQ_KEYS = ("hptq_stream", "hptq_table", "hptq_scale", "hptq_shape")
HPTQ_CHUNK_KEYS = ("hptq_chunk_rows", "hptq_offsets")
TILE_ROWS = 512  # output rows decoded at a time by the compressed CPU path


class HPTQLayout:
    """A validated stored layer: shape, table, chunk index and the stream's exact length."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.d_out, self.d_in = _check_tensors(tensors)
        try:
            self.table = huffman.HuffmanTable.from_bytes(tensors["hptq_table"])
        except huffman.HuffmanError as exc:
            raise FormatError(f"'hptq_table' is corrupt: {exc}") from None
        self.stream = tensors["hptq_stream"].detach().cpu().contiguous()
        self.scale = float(tensors["hptq_scale"][0])
        self.stored_index = all(k in tensors for k in HPTQ_CHUNK_KEYS)
        if any(k in tensors for k in HPTQ_CHUNK_KEYS) and not self.stored_index:
            raise FormatError(f"HPTQ chunk index needs both of {list(HPTQ_CHUNK_KEYS)}")
        if self.stored_index:
            self.chunk_rows, self.offsets = _check_index(tensors, self.d_out, self.stream.numel())
        else:
            self.chunk_rows = 1
            self.offsets = None  # found by decode() below

    @property
    def n_chunks(self) -> int:
        return -(-self.d_out // self.chunk_rows)

    def chunk_length(self, chunk: int) -> int:
        """Symbols in chunk ``chunk`` (the last one may hold fewer rows)."""
        rows = min(self.chunk_rows, self.d_out - chunk * self.chunk_rows)
        return rows * self.d_in

    def decode(self) -> np.ndarray:
        """Every code ``(d_out, d_in)`` int64, checking that each chunk ends where the next
        starts and the last one in the stream's final byte: a corrupt stream or index is an
        error here, at load, never a wrong weight later."""
        n = self.d_out * self.d_in
        if self.offsets is None:
            try:
                codes = huffman.decode(self.stream, self.table, n)
            except huffman.HuffmanError as exc:
                raise FormatError(f"HPTQ stream is corrupt: {exc}") from None
            self._check_end(int(huffman.symbol_lengths(codes, self.table).sum()))
            starts = huffman.chunk_starts(codes, self.table, self.d_in)
            self.offsets = torch.from_numpy(starts.astype(np.int32))
            return codes.reshape(self.d_out, self.d_in)
        starts = self.offsets.numpy().astype(np.int64)
        full = self.d_out // self.chunk_rows
        try:
            parts, ends = [], []
            if full:
                sym, end = huffman.decode_chunks(
                    self.stream, self.table, starts[:full], self.chunk_length(0)
                )
                parts.append(sym.reshape(-1))
                ends.append(end)
            if full < self.n_chunks:
                sym, end = huffman.decode_chunks(
                    self.stream, self.table, starts[full:], self.chunk_length(full)
                )
                parts.append(sym.reshape(-1))
                ends.append(end)
        except huffman.HuffmanError as exc:
            raise FormatError(f"HPTQ stream is corrupt: {exc}") from None
        end = np.concatenate(ends)
        if not np.array_equal(end[:-1], starts[1:]):
            k = int(np.flatnonzero(end[:-1] != starts[1:])[0])
            raise FormatError(
                f"HPTQ chunk {k} ends at bit {int(end[k])} but 'hptq_offsets' starts chunk "
                f"{k + 1} at bit {int(starts[k + 1])}: the stream or its offsets are corrupt"
            )
        self._check_end(int(end[-1]))
        return np.concatenate(parts).reshape(self.d_out, self.d_in)

    def _check_end(self, end_bit: int) -> None:
        n_bytes = self.stream.numel()
        if end_bit > 8 * n_bytes:
            raise FormatError(
                f"HPTQ stream is truncated: its codes need {end_bit} bits, it holds {8 * n_bytes}"
            )
        if math.ceil(end_bit / 8) != n_bytes:
            raise FormatError(
                f"HPTQ stream holds {n_bytes} bytes, its codes end at bit {end_bit}: "
                "the stream or its offsets are corrupt"
            )


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    missing = [k for k in HPTQ_KEYS if k not in tensors]
    if missing:
        raise FormatError(f"HPTQ tensors lack {missing} (have {sorted(tensors)})")
    for key, dtype, shape in (
        ("hptq_stream", torch.uint8, None),
        ("hptq_table", torch.uint8, None),
        ("hptq_scale", torch.float16, (1,)),
        ("hptq_shape", torch.int32, (2,)),
        ("hptq_chunk_rows", torch.int32, (1,)),
        ("hptq_offsets", torch.int32, None),
    ):
        if key not in tensors:
            continue
        t = tensors[key]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
            raise FormatError(f"{key!r} must be a 1-D {dtype} tensor")
        if shape is not None and tuple(t.shape) != shape:
            raise FormatError(f"{key!r} must have shape {shape}, got {tuple(t.shape)}")
    d_out, d_in = (int(x) for x in tensors["hptq_shape"])
    if d_out <= 0 or d_in <= 0:
        raise FormatError(f"'hptq_shape' must be positive, got ({d_out}, {d_in})")
    scale = float(tensors["hptq_scale"][0])
    if not (math.isfinite(scale) and scale > 0):
        raise FormatError(f"'hptq_scale' must be finite and positive, got {scale}")
    return d_out, d_in


def _check_index(tensors, d_out: int, n_bytes: int) -> tuple[int, torch.Tensor]:
    rows = int(tensors["hptq_chunk_rows"][0])
    if not 1 <= rows <= d_out:
        raise FormatError(f"'hptq_chunk_rows' must lie in 1..{d_out}, got {rows}")
    offsets = tensors["hptq_offsets"].detach().cpu().contiguous()
    n_chunks = -(-d_out // rows)
    if offsets.numel() != n_chunks:
        raise FormatError(
            f"'hptq_offsets' must hold {n_chunks} offsets ({d_out} rows in chunks of {rows}), "
            f"got {offsets.numel()}"
        )
    o = offsets.to(torch.int64)
    if int(o[0]) != 0 or bool((o[1:] < o[:-1]).any()) or int(o[-1]) > 8 * n_bytes:
        raise FormatError(
            "'hptq_offsets' must start at 0 and not decrease within the stream's "
            f"{8 * n_bytes} bits: the offsets are corrupt"
        )
    return rows, offsets


def validate_hptq(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """Keys, dtypes and shapes of a stored layer; a ``FormatError`` naming the key at fault."""
    layout = HPTQLayout(tensors)
    return layout.d_out, layout.d_in


def chunk_index(codes: torch.Tensor, table: huffman.HuffmanTable, chunk_rows: int):
    """The stored chunk index of row-major ``codes`` ``(d_out, d_in)``: ``hptq_chunk_rows`` and
    ``hptq_offsets`` (int32; a stream past 2^31 bits cannot be indexed)."""
    d_out, d_in = codes.shape
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    starts = huffman.chunk_starts(codes.cpu().numpy(), table, chunk_rows * d_in)
    if starts.size and int(starts[-1]) >= 2**31:
        raise ValueError("an HPTQ stream beyond 2^31 bits cannot be indexed with int32 offsets")
    return {
        "hptq_chunk_rows": torch.tensor([chunk_rows], dtype=torch.int32),
        "hptq_offsets": torch.from_numpy(starts.astype(np.int32)),
    }


def decode_hptq(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The integer codes (int64, ``(d_out, d_in)``) decoded from the stored stream on the CPU."""
    return torch.from_numpy(HPTQLayout(tensors).decode())


def dequantize_hptq(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``scale * codes`` in ``dtype``: the quantizer's ``Q`` bit for bit (same dtype)."""
    codes = decode_hptq(tensors)
    scale = tensors["hptq_scale"].to(dtype)
    return scale * (codes.to(dtype) - 0.0)


class HuffmanLinear(DispatchedLinear):
    """A linear layer stored as an HPTQ Huffman stream, decoded in every call or once.

    Resident: the stored tensors (what ``state_dict`` saves) and the table's few decoding
    constants. The CPU path decodes ``TILE_ROWS`` output rows at a time (every chunk of the tile
    in lockstep, :func:`~latticequant.formats.huffman.decode_chunks`) and multiplies; the CUDA
    path runs a Triton kernel that decodes its rows' chunks in registers and feeds them to the
    matmul. ``cache_weight``: True keeps the decoded float weight instead (speed, no memory
    saved); None (default) does so on the CPU path only. The stream is decoded once at load in
    every case, to refuse a corrupt stream or index there.
    """

    _stored_precision = ("hptq_scale", "code_symbols")  # kept as stored on dtype casts

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        cache_weight: bool | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        layout = HPTQLayout(tensors)
        codes = layout.decode()
        self.in_features, self.out_features = layout.d_in, layout.d_out
        self.backend = backend
        self.cache_weight = cache_weight
        self.table = layout.table
        self.last_kernel: str | None = None  # a key of HPTQFormat.kernels
        for key in HPTQ_KEYS:
            self.register_buffer(key, tensors[key].detach().cpu().clone())
        # a file without the index gets one, derived, not saved again
        persistent = layout.stored_index
        self.register_buffer(
            "hptq_chunk_rows",
            torch.tensor([layout.chunk_rows], dtype=torch.int32),
            persistent=persistent,
        )
        self.register_buffer("hptq_offsets", layout.offsets.clone(), persistent=persistent)
        limits, base = huffman.canonical_constants(self.table)
        # decoding constants for the kernel: a few dozen numbers
        self.register_buffer(
            "code_limits", torch.from_numpy(limits.astype(np.int64)), persistent=False
        )
        self.register_buffer("code_base", torch.from_numpy(base), persistent=False)
        self.register_buffer(
            "code_symbols",
            torch.from_numpy(np.append(self.table.symbols, 0).astype(np.float32)),
            persistent=False,
        )
        self._cached: torch.Tensor | None = None
        if self.caches_weight:  # the codes are at hand: no second decode
            self._cached = self._scaled(torch.from_numpy(codes), dtype)
        self.set_bias(bias, layout.d_out)

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> HuffmanLinear:
        return cls(tensors, bias=bias, dtype=dtype, **kwargs)

    @property
    def chunk_rows(self) -> int:
        return int(self.hptq_chunk_rows[0])

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's tensors as a checkpoint stores them (the chunk index included)."""
        return {k: getattr(self, k) for k in HPTQ_KEYS + HPTQ_CHUNK_KEYS}

    def _scaled(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.hptq_scale.to(dtype) * (codes.to(dtype) - 0.0)

    def decode_rows(self, r0: int, r1: int) -> torch.Tensor:
        """The codes of output rows ``r0:r1`` (int64), decoded from their chunks only."""
        R = self.chunk_rows
        c0, c1 = r0 // R, -(-r1 // R)
        offsets = self.hptq_offsets.cpu().numpy().astype(np.int64)
        first = int(offsets[c0]) >> 3
        stop = int(offsets[c1]) // 8 + 1 if c1 < offsets.size else self.hptq_stream.numel()
        stream = self.hptq_stream.cpu().numpy()[first:stop]
        sym, _ = huffman.decode_chunks(
            stream, self.table, offsets[c0:c1] - 8 * first, R * self.in_features
        )
        rows = torch.from_numpy(sym).reshape((c1 - c0) * R, self.in_features)
        return rows[r0 - c0 * R : r1 - c0 * R]

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W`` ``(d_out, d_in)``, decoded from the stream."""
        return self._scaled(self.decode_rows(0, self.out_features), dtype)

    def _torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x2.dtype == torch.float64 else torch.float32
        xc = x2.to(compute)
        if self.caches_weight:
            self.last_kernel = "torch-decoded"
            if self._cached is None or self._cached.dtype != compute:
                self._cached = self.dequantize_weight(compute).to(xc.device)
            return F.linear(xc, self._cached)
        self.last_kernel = "torch-huffman"
        y = torch.empty(xc.shape[0], self.out_features, dtype=compute, device=xc.device)
        step = max(self.chunk_rows, TILE_ROWS // self.chunk_rows * self.chunk_rows)
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            w = self._scaled(self.decode_rows(r0, r1), compute).to(xc.device)
            y[:, r0:r1] = xc @ w.t()
        return y

    def _kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        self.last_kernel = "triton-huffman"
        xs = x2 if x2.dtype in (torch.float16, torch.bfloat16, torch.float32) else x2.float()
        return kernels.hptq_matmul(
            xs,
            self.hptq_stream,
            self.hptq_offsets,
            self.code_limits,
            self.code_base,
            self.code_symbols,
            float(self.hptq_scale[0]),
            self.out_features,
            self.chunk_rows,
            out_dtype=x2.dtype if x2.dtype != torch.float64 else torch.float32,
        )

    def extra_repr(self) -> str:
        n = self.in_features * self.out_features
        stored = self.stored_tensors()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"chunk_rows={self.chunk_rows}, bits_per_weight={effective_bits(stored, n):.4f}"
        )


class HPTQFormat(Format):
    """HPTQ/HRTN: one scale per matrix and a canonical Huffman stream of unbounded codes, cut
    into chunks that decode independently. No GPTQ reader can take it."""

    name = "hptq"
    keys = HPTQ_KEYS
    optional_keys = HPTQ_CHUNK_KEYS
    key_kinds = {
        "hptq_stream": "huffman stream",
        "hptq_table": "huffman table",
        "hptq_scale": "scales",
        "hptq_shape": "shape",
        "hptq_chunk_rows": "shape",
        "hptq_offsets": "huffman offsets",
    }
    kernels = {
        "torch-decoded": "torch, HPTQ stream decoded to a dense weight kept between calls",
        "torch-huffman": f"torch, HPTQ stream decoded {TILE_ROWS} output rows at a time in "
        "every call",
        "triton-huffman": "Triton kernel decoding the HPTQ stream's chunks on chip",
    }

    def pack(self, result) -> dict[str, torch.Tensor]:
        """The stream, table, scale, shape and chunk index of an HPTQ result (its ``codes``,
        ``table``, ``stream``, ``scale`` and ``chunk_rows``)."""
        d_out, d_in = result.codes.shape
        return {
            "hptq_stream": torch.from_numpy(result.stream.copy()),
            "hptq_table": result.table.to_tensor(),
            "hptq_scale": torch.tensor([result.scale], dtype=torch.float16),
            "hptq_shape": torch.tensor([d_out, d_in], dtype=torch.int32),
            **chunk_index(result.codes, result.table, result.chunk_rows),
        }

    def unpack(self, tensors, meta):
        return decode_hptq(tensors)

    def dequantize(self, tensors, meta, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_hptq(tensors, dtype)

    def module(self, tensors, meta, bias=None) -> nn.Module:
        return build_hptq_module(tensors, meta, bias)

    def file_config(self, base, meta) -> dict:
        return super().file_config({**base, "bits": None}, meta)

    def check_file_config(self, name, tensors, meta, file_config) -> None:
        """No fixed code width: a file-level config that gives the layer bits contradicts it."""
        super().check_file_config(name, tensors, meta, file_config)
        bits = self.layer_claim(name, file_config).get("bits")
        if bits is not None:
            raise FormatError(
                f"it is {self.name} (Huffman-coded codes, no fixed code width) but the "
                f"file-level config says bits {bits!r}"
            )


def build_hptq_module(
    tensors: Mapping[str, torch.Tensor], meta: Mapping, bias: torch.Tensor | None = None
) -> HuffmanLinear:
    """The checkpoint loader's builder for the "hptq" format (errors as ``FormatError``)."""
    options = {
        "backend": str(meta.get("backend", "auto")),
        "cache_weight": meta.get("cache_weight"),
    }
    module = HuffmanLinear.from_tensors(tensors, bias=bias, **options)
    for key, have in (("in_features", module.in_features), ("out_features", module.out_features)):
        if key in meta and int(meta[key]) != have:
            raise FormatError(f"stored HPTQ tensors give {key}={have}, expected {int(meta[key])}")
    return module


HPTQ = register_format(HPTQFormat())
