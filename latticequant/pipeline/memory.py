"""What one block's quantization needs in memory, estimated before the first forward.

A run holds, at its peak: the calibration hidden states of every window (the block's inputs and
its outputs), the largest activation of one forward batch (the MLP's intermediate, the attention
scores), the block's weights with a float32 copy of each quantized weight, and the Hessians of
the layer group being solved (the pending subtrees of the summation tree) with the float64
copies the solve makes. When that exceeds what the machine has, the run is refused with the
flag to change, instead of being killed an hour later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
from dataclasses import dataclass

import torch

from latticequant.pipeline.layout import ModelLayout, linear_weight

__all__ = [
    "BlockMemory",
    "InsufficientMemoryError",
    "estimate_block_memory",
    "available_memory",
    "check_memory",
    "check_run_memory",
    "release_freed_memory",
]

GIB = 1 << 30
#: Float64 matrices of the widest Hessian a solve holds at once: the factor, gathered from H
#: and built in place (``core/triangular.py``), and the rotated Hessian beside it with
#: ``--rotate`` (``core/rotation.rotate_problem``).
SOLVE_COPIES = 1
ROTATED_SOLVE_COPIES = 2


class InsufficientMemoryError(ValueError):
    """A run that would not fit in the memory of its device."""


@dataclass(frozen=True)
class BlockMemory:
    """Bytes by kind; ``total`` is what the run needs at its peak beyond the loaded model."""

    hidden: int
    activations: int
    weights: int
    hessians: int

    @property
    def total(self) -> int:
        return self.hidden + self.activations + self.weights + self.hessians


def estimate_block_memory(
    layout: ModelLayout,
    n_windows: int,
    seqlen: int,
    batch_size: int,
    dtype: torch.dtype,
    hessian_dtype: torch.dtype = torch.float32,
    config=None,
    float_copy: bool = False,
    rotated: bool = False,
) -> BlockMemory:
    """The peak bytes of quantizing the largest block of ``layout`` on ``n_windows`` windows of
    ``seqlen`` tokens, run ``batch_size`` windows at a time in ``dtype``. ``float_copy``: the
    float-outputs objective's float block and float hidden states beside the quantized ones
    (and a cross Gram matrix beside every Hessian). ``rotated``: the rotated Hessian beside
    the factor."""
    act = torch.finfo(dtype).bits // 8
    index = max(
        range(len(layout.blocks)),
        key=lambda i: sum(p.numel() for p in layout.blocks[i].parameters()),
    )
    block = layout.blocks[index]
    shapes, group_inputs = [], []
    for subset in layout.subsets_of(index):
        widths = []
        for name in subset:
            try:
                shapes.append(tuple(linear_weight(block.get_submodule(name)).shape))
            except AttributeError:
                continue
            widths.append(shapes[-1][1])
        group_inputs += widths[:1]  # a group's layers read one input
    if not shapes:
        return BlockMemory(0, 0, 0, 0)
    hidden_size = int(getattr(config, "hidden_size", 0) or shapes[0][1])  # the first group's input
    widest = max(d_out for d_out, _ in shapes)
    tokens = n_windows * seqlen
    batch_tokens = min(batch_size, n_windows) * seqlen
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = 2 * tokens * hidden_size * act  # inputs and outputs of the block
    scores = min(batch_size, n_windows) * heads * seqlen * seqlen * act
    activations = 3 * batch_tokens * widest * act + scores
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    weights = params + sum(o * i * 4 for o, i in shapes)
    depth = int(math.log2(max(n_windows, 1))) + 1  # pending subtrees of the summation tree
    h_bytes = torch.finfo(hessian_dtype).bits // 8
    d_max = max(d_in for _, d_in in shapes)
    copies = ROTATED_SOLVE_COPIES if rotated else SOLVE_COPIES
    hessians = d_max * d_max * (h_bytes * depth + 8 * copies)
    if float_copy:
        hidden *= 2
        # its layers' inputs: all groups' at once when one pass serves them (one batch)
        activations += batch_tokens * sum(group_inputs) * act
        weights += params
        hessians += d_max * d_max * h_bytes * depth
    return BlockMemory(hidden, activations, weights, hessians)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for the run on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: BlockMemory, device: torch.device, available: int | None = None) -> None:
    """Refuse, in one line naming the flags to change, a run that cannot fit."""
    have = available_memory(device) if available is None else available
    if have is None or need.total <= have:
        return
    raise InsufficientMemoryError(
        f"quantizing one block needs about {need.total / GIB:.1f} GiB on {device} (hidden "
        f"states {need.hidden / GIB:.1f}, activations {need.activations / GIB:.1f}, weights "
        f"{need.weights / GIB:.1f}, Hessians {need.hessians / GIB:.1f}) but "
        f"{have / GIB:.1f} GiB is free; lower --nsamples or --batch-size, keep the blocks on "
        "disk with --offload, or use another --device"
    )


def check_run_memory(
    model,
    layout: ModelLayout,
    n_windows: int,
    seqlen: int,
    batch_size: int | None,
    device: torch.device,
    hessian_dtype: torch.dtype = torch.float32,
    ranks: int = 1,
    float_copy: bool = False,
    rotated: bool = False,
) -> BlockMemory:
    """Estimate one block's needs for this rank's share of the windows and refuse what cannot
    fit (:class:`InsufficientMemoryError`); returns the estimate."""
    share = -(-n_windows // max(ranks, 1))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    need = estimate_block_memory(
        layout,
        share,
        seqlen,
        share if batch_size is None else batch_size,
        dtype,
        hessian_dtype,
        getattr(model, "config", None),
        float_copy,
        rotated,
    )
    check_memory(need, torch.device(device))
    return need


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Give the pages of freed heap memory back to the system; True when that was possible.

    Each block's solves free hundreds of megabytes of float64 temporaries whose sizes grow
    glibc's mmap threshold, so later ones come from the heap and stay resident once freed:
    without this the resident memory of a run grows block by block (by about 900 MB over the
    30 blocks of the protocol's model, more than its float32 weights) and sets its peak.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
