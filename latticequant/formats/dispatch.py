"""What every quantized linear layer shares: the choice between its kernel and torch paths,
and the bookkeeping of the optional dense cache.

A subclass holds ``in_features``, ``out_features``, ``bias``, ``backend`` ("auto": the Triton
kernel for CUDA inputs, torch otherwise; "torch"; "triton", which on CPU tensors needs
``TRITON_INTERPRET=1``), ``cache_weight`` and ``_cached`` (the dense weight it keeps, or None),
and defines ``_torch_forward`` and ``_kernel_forward`` on 2-D inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from latticequant.formats import kernels
from latticequant.formats.packing import FormatError

__all__ = ["BACKENDS", "DispatchedLinear", "use_kernels"]

BACKENDS = ("auto", "torch", "triton")


def use_kernels(backend: str, x: torch.Tensor) -> bool:
    """Whether a module with this ``backend`` runs its Triton kernel on ``x``: "triton"
    always, "torch" never, "auto" for CUDA tensors when Triton is usable."""
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return x.is_cuda and kernels.kernels_usable(x.device)


class DispatchedLinear(nn.Module):
    """``y = x @ W^T + b`` through the subclass's kernel or torch path."""

    in_features: int
    out_features: int
    backend: str
    cache_weight: bool | None
    _cached: torch.Tensor | None

    _stored_precision: tuple[str, ...] = ()  # buffers that dtype casts must not touch

    def set_bias(self, bias, d_out: int) -> None:
        """The layer's bias (a copy), checked against its output size; None for none."""
        if bias is None:
            self.bias = None
            return
        if bias.shape != (d_out,):
            raise FormatError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
        self.register_buffer("bias", bias.detach().clone())

    def _apply(self, fn, *args, **kwargs):
        """Moves follow the model; dtype casts (``model.half()``) leave the stored grid as it
        is (a float16 scale cast to bfloat16 would change the weights: the activations' dtype
        is chosen per call instead); a cached dense weight is dropped."""
        self._cached = None
        kept = {name: getattr(self, name) for name in self._stored_precision}
        out = super()._apply(fn, *args, **kwargs)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return out

    @property
    def caches_weight(self) -> bool:
        return self.cache_weight is not False

    @property
    def cache_bytes(self) -> int:
        """Bytes of the dense weight kept between calls (0 when none is kept)."""
        c = self._cached
        return 0 if c is None else c.numel() * c.element_size()

    def _torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _use_kernels(self, x: torch.Tensor) -> bool:
        return use_kernels(self.backend, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features, this layer takes {self.in_features}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self._kernel_forward(x2) if self._use_kernels(x) else self._torch_forward(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)
