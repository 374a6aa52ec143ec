"""The GPTQ tensor layout of one linear layer, the one the ecosystem loads.

``W`` is ``(d_out, d_in)``, ``b`` bits, ``G`` groups:

- ``qweight`` int32 ``(d_in * b / 32, d_out)``: codes packed along the input dimension;
- ``qzeros``  int32 ``(G, d_out * b / 32)``: zero points packed along the output dimension;
- ``scales``  float16 ``(G, d_out)``;
- ``g_idx``   int32 ``(d_in,)``: group of each input column (any order: act-order included).

Bits and zero points are packed as :mod:`latticequant.formats.packing` describes. Scales are
stored in float16: a weight dequantized from the file equals the in-memory ``Q`` only up to the
float16 rounding of the scales; it equals ``fp16(scales) * (codes - zeros)`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from latticequant.core.grid import dequantize
from latticequant.formats import kernels
from latticequant.formats.dispatch import BACKENDS, DispatchedLinear
from latticequant.formats.packing import (
    SUPPORTED_BITS,
    WORD_BITS,
    FormatError,
    check_bits,
    check_checkpoint_format,
    check_divisible,
    integer_tensor,
    pack_codes,
    pack_granularity,
    pack_zeros,
    require_tensor,
    unpack_codes,
    unpack_zeros,
)
from latticequant.formats.protocol import Format, UnsupportedConfigError, register_format
from latticequant.formats.quantize_config import quantize_config_dict

GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
TILE_ROWS = 512  # input rows dequantized at a time by the packed CPU path (a multiple of 32)


def is_permuted(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when ``g_idx`` is not the natural ``j // group_size`` (act-order without static
    groups): what ``desc_act`` must say, since readers that skip ``g_idx`` assume the natural one.
    """
    g = g_idx.to(torch.int64).cpu()
    d_in = g.numel()
    natural = torch.zeros(d_in, dtype=torch.int64)
    if group_size > 0:
        natural = torch.arange(d_in, dtype=torch.int64) // group_size
    return not torch.equal(g, natural)


SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def grid_parts(codes, scales, zeros, g_idx, bits: int, scale_dtype: torch.dtype):
    """``(codes, zeros, g_idx)`` as int64, checked as one layer's grid: scales ``(d_out, G)``
    finite and storable in ``scale_dtype``, zeros of their shape, ``g_idx`` naming groups,
    codes and zero points on the ``bits``-bit grid (a one-line ``FormatError`` otherwise)."""
    d_out, d_in = codes.shape
    if scales.dim() != 2 or scales.shape[0] != d_out or scales.shape[1] == 0:
        raise FormatError(f"scales must be (d_out={d_out}, n_groups), got {tuple(scales.shape)}")
    if zeros.shape != scales.shape:
        raise FormatError(
            f"zeros must have the shape of scales {tuple(scales.shape)}, got {tuple(zeros.shape)}"
        )
    if not scales.is_floating_point() or not bool(torch.isfinite(scales).all()):
        raise FormatError("scales must be finite floating-point values")
    if scale_dtype not in SCALE_DTYPES:
        raise FormatError(f"scale_dtype must be float16, bfloat16 or float32, got {scale_dtype}")
    if scales.numel() and float(scales.abs().max()) > torch.finfo(scale_dtype).max:
        raise FormatError(f"scales exceed the range of {scale_dtype}")
    n_groups = scales.shape[1]
    g = integer_tensor(g_idx, "g_idx")
    if g.shape != (d_in,):
        raise FormatError(f"g_idx must have shape ({d_in},), got {tuple(g_idx.shape)}")
    if d_in and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise FormatError(f"g_idx values must lie in [0, {n_groups}) (the number of groups)")
    c = integer_tensor(codes, "codes")
    maxq = (1 << bits) - 1
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > maxq):
        raise FormatError(
            f"codes leave the {bits}-bit grid [0, {maxq}] (an unclipped result?): this format "
            "cannot store them; use a format with outliers such as ssqr"
        )
    z = integer_tensor(zeros, "zeros")
    if z.numel() and (int(z.min()) < 0 or int(z.max()) > maxq):
        raise FormatError(f"zero points must lie in [0, {maxq}]")
    return c, z, g


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
    check_bits(bits)
    check_checkpoint_format(checkpoint_format)
    if codes.dim() != 2:
        raise FormatError(f"codes must be 2-D (d_out, d_in), got shape {tuple(codes.shape)}")
    d_out, d_in = codes.shape
    check_divisible(d_in, bits, "d_in (input features)")
    check_divisible(d_out, bits, "d_out (output features)")
    c, z, g = grid_parts(codes, scales, zeros, g_idx, bits, scale_dtype)
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

    Raises ``FormatError`` when a dimension does not fit the packing, when codes leave the
    b-bit grid (unclipped results) or when a v1 zero point is 0; the methods refuse all of
    these before a run starts (``Method.check``), so none reaches here from the pipeline.
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


def validate_gptq(tensors: Mapping[str, torch.Tensor], bits: int) -> GPTQShape:
    """Check keys, dtypes and shapes of a GPTQ tensor set; name the key at fault."""
    check_bits(bits)
    qweight = require_tensor(tensors, "qweight", (torch.int32,), 2)
    qzeros = require_tensor(tensors, "qzeros", (torch.int32,), 2)
    scales = require_tensor(tensors, "scales", (torch.float16, torch.bfloat16, torch.float32), 2)
    g_idx = require_tensor(tensors, "g_idx", (torch.int32, torch.int64), 1)
    rows, d_out = qweight.shape
    if (rows * WORD_BITS) % bits or ((rows * WORD_BITS) // bits) % pack_granularity(bits):
        raise FormatError(f"'qweight' has {rows} rows, not a whole number of {bits}-bit blocks")
    d_in = rows * WORD_BITS // bits
    n_groups = scales.shape[0]
    if scales.shape != (n_groups, d_out) or n_groups == 0:
        raise FormatError(f"'scales' must be (n_groups, {d_out}), got {tuple(scales.shape)}")
    if d_out % pack_granularity(bits):
        raise FormatError(f"'qweight' has {d_out} columns, not packable in {bits} bits along d_out")
    if qzeros.shape != (n_groups, d_out * bits // WORD_BITS):
        raise FormatError(
            f"'qzeros' must be ({n_groups}, {d_out * bits // WORD_BITS}), got {tuple(qzeros.shape)}"
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
    check_checkpoint_format(checkpoint_format)
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
    return dequantize(codes, scales.to(dtype), zeros.to(dtype), g_idx)


def uniform_group_size(g_sorted: torch.Tensor, n_groups: int) -> int:
    """``gs`` with ``g_sorted[k] == k // gs`` for every k, or 0 when groups are not uniform.

    A single group (per-channel scales) gets a power of two at least ``K``, so every kernel tile
    lies inside it.
    """
    k = g_sorted.numel()
    if k == 0:
        return 0
    if n_groups == 1 or bool((g_sorted == g_sorted[0]).all()):
        return 1 << max(k - 1, 1).bit_length() if int(g_sorted[0]) == 0 else 0
    gs = int((g_sorted == 0).sum())
    if gs == 0:
        return 0
    expected = torch.arange(k, device=g_sorted.device) // gs
    return gs if torch.equal(g_sorted.to(torch.int64), expected) else 0


class QuantLinear(DispatchedLinear):
    """``y = x @ W^T + b`` with ``W`` stored in the GPTQ format (2, 3, 4 or 8 bits).

    Buffers (all derived once from the checkpoint tensors):
    ``qweight`` int32 packed rows in sorted group order; ``scales`` and ``zeros`` ``(G, d_out)``
    (zeros decoded from the v1/v2 convention, kept as floats of the scales' dtype);
    ``g_idx`` int32 sorted groups; ``perm`` the input permutation (empty when the checkpoint's
    groups were already contiguous).
    backend: "auto" (Triton for CUDA inputs, torch otherwise), "torch", or "triton" (CPU tensors
    then need ``TRITON_INTERPRET=1``).
    cache_weight: keep the dequantized weight of the torch path between calls, trading memory
    (a float32 copy of the weight) for speed; ``None`` (default) caches on the torch path only,
    which is where repeated dequantization would dominate (CPU evaluation).
    """

    _stored_precision = ("scales", "zeros")  # float buffers that dtype casts must not touch

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        bits: int,
        checkpoint_format: str = "gptq",
        bias: torch.Tensor | None = None,
        backend: str = "auto",
        cache_weight: bool | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        shape = validate_gptq(tensors, bits)
        self.bits = bits
        self.checkpoint_format = checkpoint_format
        self.in_features = shape.d_in
        self.out_features = shape.d_out
        self.n_groups = shape.n_groups
        self.backend = backend
        self.cache_weight = cache_weight
        self._cached: torch.Tensor | None = None
        self.last_kernel: str | None = None  # a key of KERNELS, set by each forward

        codes, scales, zeros, g_idx = unpack_gptq(tensors, bits, checkpoint_format)
        contiguous = bool((g_idx[1:] >= g_idx[:-1]).all()) if g_idx.numel() > 1 else True
        if contiguous:
            perm = torch.empty(0, dtype=torch.int64)
            qweight = tensors["qweight"].clone()
            g_sorted = g_idx
        else:
            perm = torch.argsort(g_idx, stable=True)
            qweight = pack_codes(codes[:, perm].t(), bits, dim=0)
            g_sorted = g_idx[perm]
        self.group_size = uniform_group_size(g_sorted, shape.n_groups)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.t().contiguous())
        self.register_buffer("zeros", zeros.t().to(scales.dtype).contiguous())
        self.register_buffer("g_idx", g_sorted.to(torch.int32).contiguous())
        self.register_buffer("perm", perm)
        self.set_bias(bias, shape.d_out)

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        bits: int,
        checkpoint_format: str = "gptq",
        bias: torch.Tensor | None = None,
        **kwargs,
    ) -> QuantLinear:
        return cls(tensors, bits, checkpoint_format=checkpoint_format, bias=bias, **kwargs)

    def extra_repr(self) -> str:
        gs = self.group_size if self.group_size and self.n_groups > 1 else "-"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, n_groups={self.n_groups}, group_size={gs}, "
            f"act_order={self.perm.numel() > 0}, bias={self.bias is not None}"
        )

    def to_gptq_tensors(self, checkpoint_format: str | None = None) -> dict[str, torch.Tensor]:
        """The layer's GPTQ checkpoint tensors again (original ``g_idx`` order), e.g. to save.

        For an ``SSQRLinear`` this is the dense part; its CSR buffers are stored as loaded.
        """
        codes = unpack_codes(self.qweight, self.bits, self.in_features, dim=0)
        g = self.g_idx.to(torch.int64)
        if self.perm.numel():
            codes = torch.empty_like(codes).index_copy_(0, self.perm, codes)
            g = torch.empty_like(g).index_copy_(0, self.perm, g)
        return pack_gptq_parts(
            codes.t().cpu(),
            self.scales.t().cpu(),
            self.zeros.t().cpu(),
            g.cpu(),
            self.bits,
            checkpoint_format or self.checkpoint_format,
            scale_dtype=self.scales.dtype,
        )

    # -- torch path --------------------------------------------------------------------------

    def dequantize_weight_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W^T`` ``(d_in, d_out)`` in the original input order, computed in ``dtype``."""
        codes = unpack_codes(self.qweight, self.bits, self.in_features, dim=0)
        g = self.g_idx.to(torch.int64)
        wt = dequantize(codes.t(), self.scales.t().to(dtype), self.zeros.t().to(dtype), g).t()
        if self.perm.numel():
            out = torch.empty_like(wt)
            out[self.perm] = wt
            wt = out
        return wt

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W`` ``(d_out, d_in)`` as stored (scales at their stored precision)."""
        return self.dequantize_weight_t(dtype).t().contiguous()

    def _weight_t_for(self, dtype: torch.dtype) -> torch.Tensor:
        if self.caches_weight and self._cached is not None and self._cached.dtype == dtype:
            return self._cached
        wt = self._dense_weight_t(dtype)
        if self.caches_weight:
            self._cached = wt
        return wt

    def _dense_weight_t(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize_weight_t(dtype)

    def _packed_matmul(self, xc: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` from the packed codes, dequantizing ``TILE_ROWS`` input rows at a time:
        only the codes, scales and zeros stay resident, and a tile of the weight transiently."""
        xs = xc[:, self.perm] if self.perm.numel() else xc  # the groups' sorted order
        y = torch.zeros(xc.shape[0], self.out_features, dtype=xc.dtype, device=xc.device)
        scales, zeros = self.scales.to(xc.dtype), self.zeros.to(xc.dtype)
        for r0 in range(0, self.in_features, TILE_ROWS):
            rows = min(TILE_ROWS, self.in_features - r0)
            codes = self._tile_codes(r0, rows)
            g = self.g_idx[r0 : r0 + rows].to(torch.int64)
            w = dequantize(codes.t(), scales.t(), zeros.t(), g).t()
            y.addmm_(xs[:, r0 : r0 + rows], w)
        return y

    def _tile_codes(self, r0: int, rows: int) -> torch.Tensor:
        """The codes of sorted input rows ``r0 : r0 + rows`` (int32; ``r0`` a multiple of 32).

        Widths that fill whole words (2, 4, 8 bits) take one shift per position in the word;
        3 bits, whose codes straddle words, go through :func:`unpack_codes`."""
        w0, words = r0 * self.bits // 32, -(-rows * self.bits // 32)
        if self.bits == 3:
            return unpack_codes(self.qweight[w0 : w0 + words + 1], 3, rows, dim=0)
        per_word = 32 // self.bits
        shifts = torch.arange(0, 32, self.bits, dtype=torch.int32, device=self.qweight.device)
        block = self.qweight[w0 : w0 + words]
        codes = (block[:, None, :] >> shifts[None, :, None]) & ((1 << self.bits) - 1)
        return codes.reshape(words * per_word, -1)[:rows]

    def _torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x2.dtype == torch.float64 else torch.float32
        xc = x2.to(compute)
        if self.caches_weight:
            self.last_kernel = "torch-dense"
            return xc @ self._weight_t_for(compute)
        self.last_kernel = "torch-packed"
        return self._packed_matmul(xc)

    # -- kernel path -------------------------------------------------------------------------

    def _kernel_dense(self, x2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        xs = x2[:, self.perm] if self.perm.numel() else x2
        if xs.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            xs = xs.float()
        return kernels.gptq_matmul(
            xs,
            self.qweight,
            self.scales,
            self.zeros,
            self.g_idx,
            self.bits,
            group_size=self.group_size,
            out_dtype=out_dtype,
        )

    def _kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        self.last_kernel = "triton"
        return self._kernel_dense(x2, x2.dtype if x2.dtype != torch.float64 else torch.float32)


def check_packable(bits: int, d_out: int | None = None, d_in: int | None = None) -> None:
    """Refuse a layer whose dimensions do not fill whole words at ``bits`` bits."""
    g = pack_granularity(bits)
    for what, n in (("d_in", d_in), ("d_out", d_out)):
        if n is not None and n % g:
            raise UnsupportedConfigError(
                f"{what}={n} is not a multiple of {g}, which {bits}-bit GPTQ packing needs; "
                f"skip this layer (--skip) or use another --bits"
            )


UNCLIPPED_FORMATS = "ssqr, hptq or hrtn"


class GPTQFormat(Format):
    """The GPTQ layout; ``gptq`` stores zero points minus one (v1), ``gptq_v2`` as they are
    (docs/kernels.md). GPTQModel's loader takes an asymmetric grid only as v2
    (docs/fold_readers.md)."""

    keys = GPTQ_KEYS
    key_kinds = {"qweight": "codes", "qzeros": "zeros", "scales": "scales", "g_idx": "g_idx"}
    kernels = {
        "triton": "Triton kernel on the packed codes",
        "torch-packed": f"torch, packed codes dequantized {TILE_ROWS} input rows at a time",
        "torch-dense": "torch, dense weight cached from the packed codes",
    }
    quant_method = "gptq"

    def __init__(self, name: str) -> None:
        check_checkpoint_format(name)
        self.name = name

    def check(self, config, d_out: int | None = None, d_in: int | None = None) -> None:
        if config.bits not in SUPPORTED_BITS:
            usable = ", ".join(str(b) for b in SUPPORTED_BITS)
            raise UnsupportedConfigError(
                f"bits={config.bits} (--bits {config.bits}) cannot be stored in the GPTQ format, "
                f"which packs {usable} bits; use one of those"
            )
        if not config.clip:
            raise UnsupportedConfigError(
                "clip=False (--no-clip) leaves codes off the b-bit grid, which the GPTQ format "
                f"cannot store; use a method whose format stores unclipped codes: "
                f"{UNCLIPPED_FORMATS}"
            )
        check_packable(config.bits, d_out, d_in)

    def min_zero(self, config) -> int:
        """v1 stores ``offset - 1``, so an asymmetric grid keeps its offsets at 1 or above."""
        return 1 if self.name == "gptq" and not config.sym else 0

    def pack(self, result) -> dict[str, torch.Tensor]:
        return pack_gptq(result, checkpoint_format=self.name)

    def unpack(self, tensors, meta):
        return unpack_gptq(tensors, _meta_bits(meta), self.name)

    def dequantize(self, tensors, meta, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_gptq(tensors, _meta_bits(meta), self.name, dtype)

    def module(self, tensors, meta, bias=None) -> nn.Module:
        module = QuantLinear(tensors, _meta_bits(meta), self.name, bias, **module_options(meta))
        check_meta_dims(meta, module.in_features, module.out_features)
        return module

    def file_config(self, base, meta) -> dict:
        return quantize_config_dict(
            bits=base["bits"],
            group_size=base["group_size"],
            desc_act=base["desc_act"],
            sym=base["sym"],
            static_groups=bool(meta.get("static_groups", False)),
            damp_percent=float(meta.get("damp", 0.01)),
            checkpoint_format=self.name,
            meta={"method": meta.get("method")},
        )

    def reads(self, file_config) -> bool:
        """A GPTQ file, or one of ours: plain GPTQ layers sit beside rotated ones in a file of
        ``--rotate folded+online``, which only our loader reads."""
        return file_config.get("quant_method") in (self.quant_method, Format.quant_method)

    def check_file_config(self, name, tensors, meta, file_config) -> None:
        """Its zero-point convention as the file names it, and its code width, groups,
        act-order and symmetry as the file-level config says them for this layer."""
        super().check_file_config(name, tensors, meta, file_config)
        named = ["checkpoint_format"]
        if file_config.get("quant_method") == self.quant_method:  # GPTQ readers take the file
            named.append("format")
        for key in named:
            if file_config.get(key, self.name) != self.name:
                raise FormatError(
                    f"it stores {self.name} zero points but the file-level {key} is "
                    f"{file_config[key]!r}: GPTQ readers would read them wrong"
                )
        check_grid_claim(tensors, self.layer_claim(name, file_config), file_config, self.name)


def stored_bits(tensors: Mapping[str, torch.Tensor]) -> int:
    """The code width of GPTQ-layout tensors: ``qweight`` rows x 32 over the inputs."""
    rows, d_in = tensors["qweight"].shape[0], tensors["g_idx"].numel()
    if d_in == 0 or (rows * WORD_BITS) % d_in:
        raise FormatError(f"qweight has {rows} rows for {d_in} inputs (g_idx): no whole code width")
    return rows * WORD_BITS // d_in


def groups_fit(g_idx: torch.Tensor, n_groups: int, group_size) -> bool:
    """Whether ``g_idx`` puts ``group_size`` inputs in each of ``n_groups`` groups (the last
    one the remainder); -1, or a size of at least the inputs, means one group."""
    d_in = g_idx.numel()
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        return False
    if group_size == -1 or group_size >= d_in:
        want = [d_in]
    elif group_size > 0:
        rest = [d_in % group_size] if d_in % group_size else []
        want = [group_size] * (d_in // group_size) + rest
    else:
        return False
    if len(want) != n_groups:
        return False
    return torch.bincount(g_idx.to(torch.int64), minlength=n_groups).tolist() == want


def check_grid_claim(tensors, claim: Mapping, file_config: Mapping, zeros: str) -> None:
    """GPTQ-layout tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) against what the
    file-level config says of their layer (``claim``: bits, group_size, sym) and its desc_act;
    ``zeros``: the stored zero-point convention. A one-line ``FormatError`` otherwise."""
    bits, g_idx = stored_bits(tensors), tensors["g_idx"]
    if claim.get("bits") != bits:
        raise FormatError(
            f"it stores {bits}-bit codes but the file-level config says bits {claim.get('bits')!r}"
        )
    n_groups, group_size = tensors["scales"].shape[0], claim.get("group_size")
    if not groups_fit(g_idx, n_groups, group_size):
        raise FormatError(
            f"it stores {n_groups} groups over {g_idx.numel()} inputs, not group_size "
            f"{group_size!r} as the file-level config says"
        )
    if is_permuted(g_idx, group_size) and not file_config.get("desc_act"):
        raise FormatError(
            "its g_idx is permuted (act-order) but the file-level desc_act is false: readers "
            "that skip g_idx would read it wrong"
        )
    if claim.get("sym"):
        d_out = tensors["qweight"].shape[1]
        stored = unpack_zeros(tensors["qzeros"], bits, d_out, zeros)
        if not bool((stored == 1 << (bits - 1)).all()):
            raise FormatError(
                f"the file-level config says sym true but it has zero points other than "
                f"{1 << (bits - 1)}"
            )


def _meta_bits(meta) -> int:
    try:
        bits = int(meta["bits"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"module meta must give an integer 'bits', got {dict(meta)!r}") from None
    check_bits(bits)
    return bits


def module_options(meta) -> dict:
    """The loader's options for a module: ``backend`` and ``cache_weight``."""
    return {"backend": str(meta.get("backend", "auto")), "cache_weight": meta.get("cache_weight")}


def check_meta_dims(meta, d_in: int, d_out: int) -> None:
    """Refuse stored tensors whose shape differs from what the checkpoint records."""
    for key, have in (("in_features", d_in), ("out_features", d_out)):
        if key in meta and int(meta[key]) != have:
            raise FormatError(f"stored tensors give {key}={have}, expected {int(meta[key])}")


GPTQ_V1 = register_format(GPTQFormat("gptq"))
GPTQ_V2 = register_format(GPTQFormat("gptq_v2"))
