"""Configuration of the lattice core: one validated dataclass, shared by GPTQ, Babai and RTN."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

ORDER_NAMES = ("natural", "reverse", "act", "min-pivot")
SCALE_METHODS = ("minmax", "mse", "hessian")
REFINE_STEPS = ("cd", "scales")

Order = str | torch.Tensor


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix is put on a grid and decoded.

    bits: code width b, codes live in ``{0 .. 2^b - 1}`` when clipped (2..8).
    group_size: input columns sharing one scale; -1 means one scale per output row.
      When it does not divide d_in the last group is shorter (``g_idx = j // group_size``).
    sym: symmetric grid (offset fixed at ``2^(b-1)``) or asymmetric (offset fitted).
    order: processing order. For ``gptq_quantize`` it is GPTQ's processing order; for
      ``babai_quantize`` the basis order, decoded from the last vector to the first.
      ``"natural"`` and ``"reverse"`` are literal permutations in each convention;
      ``"act"`` and ``"min-pivot"`` name heuristics that each function applies in its own
      convention, so ``gptq_quantize(cfg)`` and ``babai_quantize(cfg)`` decode in the same
      sequence for them. A LongTensor is taken literally.
    clip: clamp codes to the b-bit grid; ``False`` lets codes leave it (the bound then holds).
    scale_method: ``"minmax"``, ``"mse"`` (shrink the range to minimise ``|w - q|^2.4``) or
      ``"hessian"`` (shrink it to minimise ``sum_j H_jj (w_j - q_j)^2``; static grids only).
    static_groups: fit every grid on the original weights before any update (the paper's
      setting); ``False`` refits each group when the loop reaches it, on the error-updated
      weights (the reference GPTQ's behaviour, needed for checkpoints made that way).
    damp: relative damping ``lambda = damp * mean(diag H)``, raised step by step if the
      Cholesky factorisation fails; the value used is recorded in the result.
    block_size: columns per lazy-batch block (speed only, never the result).
    refine: refinement after the decode, comma-separated steps of ``REFINE_STEPS`` ("cd":
      coordinate descent on the codes, "scales": least-squares scales and offsets with the
      codes fixed), "" for none; the methods apply it (:func:`latticequant.core.refine.refine`).
    refine_sweeps: coordinate-descent sweeps per round (fewer when a sweep moves nothing).
    refine_rounds: rounds of the steps, alternated until the loss stops falling.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    order: Order = "natural"
    clip: bool = True
    scale_method: str = "minmax"
    static_groups: bool = True
    damp: float = 0.01
    block_size: int = 128
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    mse_norm: float = 2.4
    refine: str = ""
    refine_sweeps: int = 1
    refine_rounds: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or not (
            self.group_size == -1 or self.group_size > 0
        ):
            raise ValueError(
                f"group_size must be -1 (per output channel) or a positive integer, "
                f"got {self.group_size!r}"
            )
        if isinstance(self.order, str):
            if self.order not in ORDER_NAMES:
                raise ValueError(
                    f"order must be one of {ORDER_NAMES} or a LongTensor permutation, "
                    f"got {self.order!r}"
                )
        elif isinstance(self.order, torch.Tensor):
            if self.order.dim() != 1 or self.order.is_floating_point() or self.order.is_complex():
                raise ValueError("order must be a 1-D integer tensor (a permutation of d_in)")
        else:
            raise ValueError(f"order must be a string or a LongTensor, got {type(self.order)}")
        if self.scale_method not in SCALE_METHODS:
            raise ValueError(
                f"scale_method must be one of {SCALE_METHODS}, got {self.scale_method!r}"
            )
        if self.scale_method == "hessian" and not self.static_groups and self.group_size != -1:
            raise ValueError(
                "scale_method 'hessian' fits a static grid on the Hessian's diagonal: "
                "use static_groups=True (--static-groups)"
            )
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < float("inf")):
            raise ValueError(f"damp must be a finite non-negative number, got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.refine, str) or (
            self.refine and any(p not in REFINE_STEPS for p in self.refine.split(","))
        ):
            raise ValueError(
                f"refine must be comma-separated steps of {REFINE_STEPS} (or empty), "
                f"got {self.refine!r}"
            )
        for name in ("refine_sweeps", "refine_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.mse_maxshrink < 1 or self.mse_grid < 1:
            raise ValueError("mse_maxshrink must lie in (0, 1) and mse_grid be positive")
        if not (isinstance(self.mse_norm, (int, float)) and 0 < self.mse_norm < float("inf")):
            raise ValueError(f"mse_norm must be a finite positive number, got {self.mse_norm!r}")

    @property
    def maxq(self) -> int:
        """Largest code on the clipped grid, ``2^b - 1``."""
        return (1 << self.bits) - 1

    @property
    def refine_steps(self) -> tuple[str, ...]:
        """The refinement steps in order (empty for none)."""
        return tuple(self.refine.split(",")) if self.refine else ()

    def replace(self, **changes) -> QuantConfig:
        return replace(self, **changes)
