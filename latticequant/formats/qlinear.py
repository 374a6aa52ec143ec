"""Quantized linear layers built from checkpoint tensors: GPTQ (``QuantLinear``) and SSQR.

Both replace ``nn.Linear`` when a saved model is loaded. On CUDA they run the Triton kernels of
``latticequant.kernels``; on the CPU they dequantize the weight and call a dense matmul (the
dequantized weight can be cached). An act-order ``g_idx`` is handled once at load: the input rows
of the packed weight are permuted so that groups are contiguous, and the forward pass permutes the
activations' columns the same way (``x[..., perm]``), so the kernels read each group in one run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from latticequant.formats import kernels
from latticequant.formats.dispatch import BACKENDS, DispatchedLinear
from latticequant.formats.gptq import pack_gptq_parts, unpack_gptq, validate_gptq
from latticequant.formats.hptq import TILE_ROWS as HPTQ_TILE_ROWS
from latticequant.formats.packing import FormatError, pack_codes, unpack_codes
from latticequant.formats.ssqr import validate_csr

TILE_ROWS = 512  # input rows dequantized at a time by the packed CPU path (a multiple of 32)

# what ran, as reported by ``latticequant eval`` and ``generate`` (QuantLinear.last_kernel)
KERNELS = {
    "triton": "Triton kernel on the packed codes",
    "torch-packed": f"torch, packed codes dequantized {TILE_ROWS} input rows at a time",
    "torch-dense": "torch, dense weight cached from the packed codes",
    "torch-decoded": "torch, HPTQ stream decoded to a dense weight kept between calls",
    "torch-huffman": (
        f"torch, HPTQ stream decoded {HPTQ_TILE_ROWS} output rows at a time in every call"
    ),
    "triton-huffman": "Triton kernel decoding the HPTQ stream's chunks on chip",
}


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
        if bias is not None:
            if bias.shape != (shape.d_out,):
                raise FormatError(f"bias must have shape ({shape.d_out},), got {tuple(bias.shape)}")
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

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

    def _apply(self, fn, *args, **kwargs):
        """Moves follow the model; dtype casts (``model.half()``) leave the grid as stored.

        Scales keep their checkpoint precision (a float16 scale cast to bfloat16 would change
        the weights); the activations' dtype is chosen per call instead.
        """
        self._cached = None  # device or dtype moves invalidate the cached weight
        grid = {name: getattr(self, name) for name in self._stored_precision}
        out = super()._apply(fn, *args, **kwargs)
        for name, before in grid.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return out

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
        wt = self.scales.to(dtype)[g] * (codes.to(dtype) - self.zeros.to(dtype)[g])
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
            codes = self._tile_codes(r0, rows).to(xc.dtype)
            gs = self.group_size
            if gs and r0 % gs == 0 and rows % gs == 0:  # whole groups: broadcast their grid
                g = slice(r0 // gs, (r0 + rows) // gs)
                codes = codes.view(rows // gs, gs, -1)
                w = ((codes - zeros[g, None]) * scales[g, None]).view(rows, -1)
            else:
                g = self.g_idx[r0 : r0 + rows].to(torch.int64)
                w = scales[g] * (codes - zeros[g])
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


class SSQRLinear(QuantLinear):
    """SSQR layer: the GPTQ dense part (symmetric grid) plus CSR outliers, ``W = dense + S``.

    The outliers are a second pass: a Triton CSR kernel on the kernel path, a torch sparse CSR
    matmul on the CPU path (folded into the cached weight when caching).
    """

    _stored_precision = ("scales", "zeros", "outlier_val")

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        bits: int,
        checkpoint_format: str = "gptq",
        bias: torch.Tensor | None = None,
        backend: str = "auto",
        cache_weight: bool | None = None,
    ) -> None:
        super().__init__(tensors, bits, checkpoint_format, bias, backend, cache_weight)
        self.n_outliers = validate_csr(tensors, self.out_features, self.in_features)
        self.register_buffer("outlier_rowptr", tensors["outlier_rowptr"].to(torch.int32).clone())
        self.register_buffer("outlier_col", tensors["outlier_col"].clone())
        self.register_buffer("outlier_val", tensors["outlier_val"].clone())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outliers={self.n_outliers}"

    def outliers(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The outlier matrix ``S`` ``(d_out, d_in)`` as a sparse CSR tensor."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta": nothing to act on
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.outlier_rowptr.to(torch.int64),
                self.outlier_col.to(torch.int64),
                self.outlier_val.to(dtype),
                size=(self.out_features, self.in_features),
                check_invariants=False,  # validated at load
            )

    def dequantize_weight_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(dense + S)^T`` in the original input order."""
        return super().dequantize_weight_t(dtype) + self.outliers(dtype).to_dense().t()

    def _dense_weight_t(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize_weight_t(dtype)  # the outliers folded into the cached weight

    def _torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x2.dtype == torch.float64 else torch.float32
        xc = x2.to(compute)
        if self.caches_weight:
            self.last_kernel = "torch-dense"
            return xc @ self._weight_t_for(compute)
        self.last_kernel = "torch-packed"
        y = self._packed_matmul(xc)
        if self.n_outliers:
            y = y + torch.sparse.mm(self.outliers(compute), xc.t()).t()
        return y

    def _kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        self.last_kernel = "triton"
        y = self._kernel_dense(x2, x2.dtype if x2.dtype != torch.float64 else torch.float32)
        if self.n_outliers:
            xk = x2 if x2.dtype != torch.float64 else x2.float()
            kernels.csr_matmul_add(xk, self.outlier_rowptr, self.outlier_col, self.outlier_val, y)
        return y
