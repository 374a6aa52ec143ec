"""Which lattice problem each layer solves: its target point and its basis, for every method.

Two options change the problem a method is handed, never the method:

- ``objective="float-outputs"`` moves the target from ``W`` to the point whose outputs on the
  quantized inputs best match the float model's outputs on the float inputs (restarted from
  the quantized stream one block back, docs/targets.md)
  (:func:`latticequant.core.objective.output_target`); the pipeline accumulates the cross Gram
  matrix ``C = X^T X~`` beside the Hessian for it.
- ``rotate="hadamard"`` hands the method ``(W R, R^T H R)`` for a randomised Hadamard ``R``
  (:mod:`latticequant.core.rotation`), stores ``R`` beside the method's tensors and feeds
  forward ``Q R^T``, which is what the rotated layer computes. The stored format's rotated
  variant picks ``R`` (:meth:`~latticequant.formats.protocol.Format.layer_rotation`): ours draw
  one per layer; compressed-tensors' is the block Hadamard its readers build, one per size.

:func:`solve_layer` is the only place either happens; the method sees a weight matrix and a
Hessian as always.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch

from latticequant.core.objective import output_target
from latticequant.core.result import row_losses
from latticequant.core.rotation import rotate_problem, split_size
from latticequant.formats.bits import total_bits
from latticequant.formats.protocol import Format
from latticequant.formats.rotation import rotated
from latticequant.methods.registry import LayerQuant, Method, UnsupportedConfigError

__all__ = [
    "OBJECTIVES",
    "REFERENCES",
    "ROTATIONS",
    "TargetConfig",
    "layer_seed",
    "check_target",
    "layer_format",
    "solve_layer",
]

OBJECTIVES = ("layer", "float-outputs")
#: where the float-outputs objective's float reference starts (docs/targets.md): the float
#: model restarted from the quantized stream one block back, the whole float model, or the
#: block's own float copy on the quantized stream
REFERENCES = ("previous-block", "model", "block")
ROTATIONS = ("none", "hadamard", "folded", "folded+online")
ONLINE_FOLDED = ("mlp.down_proj",)  # where folded+online keeps a rotation at run time


@dataclass(frozen=True)
class TargetConfig:
    """The problem every layer solves.

    objective: ``"layer"`` (each layer matches its float weights on its own inputs) or
      ``"float-outputs"`` (each layer matches the float model's outputs; one float copy of the
      block runs beside the quantized one).
    rotate: ``"none"``; ``"hadamard"`` (every layer quantized in a randomised Hadamard basis
      of its inputs, applied at run time); ``"folded"`` (rotations of the residual stream and of
      each head's values folded into the float weights before quantizing: an ordinary model);
      ``"folded+online"`` (folded, and ``down_proj``'s input rotated at run time, the one place
      the nonlinearity stops folding).
    seed: the seed every rotation is drawn from (with the layer's name).
    damp: relative damping of the float-outputs target's solve.
    reference: what the float-outputs objective's ``X`` is: ``"previous-block"`` (the float
      blocks before and of this layer run on the quantized stream's input one block back; the
      best measured), ``"model"`` (the whole float model from the embeddings) or ``"block"``
      (this block's float copy on the quantized stream).
    """

    objective: str = "layer"
    rotate: str = "none"
    seed: int = 0
    damp: float = 0.01
    reference: str = "previous-block"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        if self.rotate not in ROTATIONS:
            raise ValueError(f"rotate must be one of {', '.join(ROTATIONS)}, got {self.rotate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < 10):
            raise ValueError(f"damp must be a number in [0, 10), got {self.damp!r}")
        if self.reference not in REFERENCES:
            raise ValueError(
                f"reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}"
            )
        if self.reference != "previous-block" and not self.float_outputs:
            raise ValueError(
                f"a float reference ({self.reference!r}) needs the float-outputs objective: "
                "add --objective float-outputs or leave the reference out"
            )

    @property
    def float_outputs(self) -> bool:
        return self.objective == "float-outputs"

    @property
    def rotated(self) -> bool:
        """Whether some layer is quantized in a rotated basis applied at run time."""
        return self.rotate in ("hadamard", "folded+online")

    @property
    def folded(self) -> bool:
        """Whether rotations are folded into the float model before quantizing."""
        return self.rotate.startswith("folded")

    def rotates(self, name: str) -> bool:
        """Whether layer ``name`` (its full name) is quantized in a rotated basis."""
        if self.rotate == "folded+online":
            return name.endswith(ONLINE_FOLDED)
        return self.rotate == "hadamard"

    @property
    def is_default(self) -> bool:
        return self == TargetConfig()


def layer_seed(seed: int, name: str) -> int:
    """The seed of one layer's rotation: the run's seed and the layer's full name, so layers
    get independent rotations and a rerun the same ones."""
    return (zlib.crc32(name.encode()) + 0x9E3779B1 * int(seed)) % (1 << 62)


def check_target(target: TargetConfig, name: str, d_in: int) -> None:
    """Refuse, before any forward pass, a layer the rotation cannot take (its size)."""
    if target.rotates(name):
        try:
            split_size(int(d_in))
        except ValueError as exc:
            raise UnsupportedConfigError(f"{name}: {exc}") from None


def layer_format(fmt: Format, target: TargetConfig, name: str | None = None) -> Format:
    """The format layer ``name`` is written in: ``fmt``, or its rotated variant when the target
    rotates it (the method packs ``fmt``; the transform's tensors ride beside). Without a name:
    the checkpoint's, rotated when any layer is."""
    rotates = target.rotated if name is None else target.rotates(name)
    return rotated(fmt) if rotates else fmt


def solve_layer(
    method: Method,
    W: torch.Tensor,
    H: torch.Tensor,
    config,
    target: TargetConfig,
    name: str,
    cross: torch.Tensor | None = None,
    fmt: Format | None = None,
) -> LayerQuant:
    """One layer's :class:`LayerQuant` on the problem ``target`` describes.

    W: the float weights ``(d_out, d_in)``; H: the Hessian of the layer's (quantized) inputs;
    cross: ``X^T X~ / n`` for the float-outputs objective; fmt: the format the method packs
    (its default when None). The returned ``Q`` is in the layer's own input basis, ``tensors``
    include the rotation's.
    """
    context = method.context(fmt, name)
    if target.is_default:
        return method.quantize(W, H, config, context)
    stats: dict[str, float | str] = {}
    T = W
    if target.float_outputs:
        if cross is None:
            raise RuntimeError(f"{name}: the float-outputs objective needs the cross Gram matrix")
        T64, used = output_target(W, H, cross, target.damp)
        stats["objective"] = target.objective
        stats["float_reference"] = target.reference
        # (T - W) H (T - W)^T summed, a block of H's columns at a time: no float64 copy of H
        stats["target_shift"] = float(row_losses(T64, H, W.to(torch.float64)).sum())
        stats["target_damp"] = used
        T = T64.to(W.dtype)
    rotation = None
    if target.rotates(name):  # the rotation the stored format's readers apply
        seed = layer_seed(target.seed, name)
        rotation, stored = rotated(context.format).layer_rotation(W.shape[1], seed)
        reserved = total_bits(stored) / W.numel() if stored else 0.0
        T64, H_rot = rotate_problem(T.to(torch.float64), H, rotation)  # H read by rows
        T, H = T64.to(W.dtype), H_rot
        context = dataclasses.replace(context, reserved_bits=reserved)
    lq = method.quantize(T, H, config, context)
    lq.stats.update(stats)
    if target.folded:  # the model's float weights it was handed were rotated
        lq.stats["rotation"] = target.rotate
    if rotation is not None:
        Q = rotation.apply_transpose(lq.Q.to(torch.float64)).to(lq.Q.dtype)
        lq = LayerQuant(Q=Q, tensors={**lq.tensors, **stored}, stats=lq.stats)
        lq.stats["rotation"] = target.rotate
        lq.stats["rotation_bits"] = reserved
        if "bits_per_weight" in lq.stats:
            lq.stats["bits_per_weight"] = float(lq.stats["bits_per_weight"]) + reserved
    return lq
