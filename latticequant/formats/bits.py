"""Effective bits per weight, counted from what a layer really stores (docs/theory.md §7).

Every stored tensor counts at its storage size: packed codes (int32 words, padding included),
16-bit scales, packed zero points, ``g_idx``, outlier values, their column indices and row
pointers, Huffman bitstreams (whole bytes) and tables. Nothing is estimated: the numbers are
the sizes of the tensors written to the checkpoint.

Worked example (GPTQ, 4 bits, groups of 32, ``W`` 64 x 128): ``qweight`` is 16 x 64 int32
(4 bits per weight), ``scales`` 4 x 64 float16 (0.5), ``qzeros`` 4 x 8 int32 (0.125), ``g_idx``
128 int32 (0.5): 5.125 bits per weight in all.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "tensor_bits",
    "bits_breakdown",
    "effective_bits",
    "total_bits",
]


def tensor_bits(t: torch.Tensor) -> int:
    """Storage size of one tensor in bits (``numel * element_size * 8``)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"expected a tensor, got {type(t).__name__}")
    return t.numel() * t.element_size() * 8


def _checked_bits(
    tensors: Mapping[str, torch.Tensor], exact_bits: Mapping[str, int] | None
) -> dict[str, int]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("tensors must be a non-empty mapping of stored tensors")
    exact = dict(exact_bits or {})
    unknown = sorted(set(exact) - set(tensors))
    if unknown:
        raise ValueError(f"exact_bits names keys that are not stored: {unknown}")
    out = {}
    for key, t in tensors.items():
        stored = tensor_bits(t)
        if key in exact:
            n = exact[key]
            if not isinstance(n, int) or n < 0 or n > stored:
                raise ValueError(
                    f"exact_bits[{key!r}] = {n!r} must be an integer in [0, {stored}] "
                    f"(the tensor's storage size)"
                )
            out[key] = n
        else:
            out[key] = stored
    return out


def total_bits(
    tensors: Mapping[str, torch.Tensor], exact_bits: Mapping[str, int] | None = None
) -> int:
    """Bits stored for a layer; ``exact_bits`` may replace a key's size by its payload size."""
    return sum(_checked_bits(tensors, exact_bits).values())


def bits_breakdown(
    tensors: Mapping[str, torch.Tensor],
    n_weights: int,
    exact_bits: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Bits per weight of each stored key (keys without the module prefix)."""
    if isinstance(n_weights, bool) or not isinstance(n_weights, int) or n_weights <= 0:
        raise ValueError(f"n_weights must be a positive integer, got {n_weights!r}")
    return {k: b / n_weights for k, b in _checked_bits(tensors, exact_bits).items()}


def effective_bits(
    tensors: Mapping[str, torch.Tensor],
    n_weights: int,
    exact_bits: Mapping[str, int] | None = None,
) -> float:
    """Bits per weight of everything a layer stores.

    ``exact_bits`` maps a key to the number of bits it really needs when that is less than its
    storage (for example a Huffman stream's payload without its final byte's padding); by
    default every tensor counts in full, which is what the checkpoint holds.
    """
    return sum(bits_breakdown(tensors, n_weights, exact_bits).values())
