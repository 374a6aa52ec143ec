"""Rotations folded into the weights: the same model, with incoherent weights, that any reader runs.

A pre-norm decoder only ever reads its residual stream ``h`` through an RMSNorm, and RMSNorm
commutes with an orthogonal ``R1`` once its scale is moved into the layers that read it:
``rms(h R1) = rms(h)``, so ``norm(h R1) = norm(h) R1`` when the norm's weight is all ones.
Rotating the stream (``h -> h R1``) therefore changes no output if every layer that writes the
stream writes ``y R1`` and every layer that reads it undoes ``R1`` (computational invariance,
QuaRot arXiv 2404.00456 §3-4, SpinQuant arXiv 2405.16406 §3). With residual vectors as rows
and PyTorch's ``(d_out, d_in)`` weights (a layer computes ``x W^T + b``):

    E      <- E R1                                        embeddings (rows are residual vectors)
    W      <- W diag(g) R1,         b unchanged           q, k, v, gate, up, lm_head (readers)
    W      <- R1^T W,               b <- R1^T b           o_proj, down_proj (writers)

where ``g`` is the scale of the norm the reader sits behind (that norm becomes all ones). Inside
attention, a second orthogonal ``R2`` of the head dimension acts on every head's values and the
matching columns of ``o_proj`` (the attention weights mix tokens, not features, so ``v R2``
passes through them):

    W_v[h] <- R2^T W_v[h],  b_v[h] <- R2^T b_v[h]          each KV head's rows
    W_o[:, i] <- W_o[:, i] R2                              each query head's columns

One ``R2`` serves every head, so grouped-query attention (query heads sharing a KV head) needs
nothing more. Queries and keys are left alone: rotary embeddings sit between them.

The result is an ordinary float model of the same architecture (only ``lm_head`` may become a
separate tensor, see :func:`fold_rotations`); it is then quantized like any other, and the
rotations cost nothing at run time. Every product is computed in float64, a block of rows or
columns at a time, and written back once in the model's dtype.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from latticequant.core.rotation import Rotation, hadamard_rotation, split_size
from latticequant.pipeline.layout import UnsupportedModelError
from latticequant.pipeline.target import layer_seed

log = logging.getLogger(__name__)

__all__ = ["FOLD_FAMILIES", "FoldPlan", "FoldReport", "check_foldable", "fold_rotations"]

#: Families whose blocks are exactly ``h + attn(norm(h))`` then ``h + mlp(norm(h))`` with
#: ``norm(x) = x / rms(x) * g``: the residual rotation passes through them unchanged.
FOLD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

_REFUSED = {
    "gemma2": (
        "its post-attention and post-feedforward norms rescale each branch after o_proj and "
        "down_proj, where no linear layer can absorb their scale, so R1 cannot pass them"
    ),
    "opt": "its LayerNorms subtract the mean, which a rotation of the residual does not keep",
    "gpt2": "its LayerNorms subtract the mean, which a rotation of the residual does not keep",
}
_REFUSED["gemma3"] = _REFUSED["gemma3_text"] = _REFUSED["gemma2"]

_READ_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_READ_MLP = ("mlp.gate_proj", "mlp.up_proj")
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")

#: float64 elements per block of a weight rotated at once (32 MiB).
BLOCK_ELEMENTS = 1 << 22


@dataclass
class FoldReport:
    """What :func:`fold_rotations` did to a model.

    seed: the seed both rotations are drawn from (``residual_seed``, ``head_seed`` derived
      from it with :func:`latticequant.pipeline.target.layer_seed`).
    residual: ``R1``, of size hidden_size; head: ``R2``, of size head_dim.
    untied: whether ``lm_head`` was given its own weight (tied embeddings whose final norm
      is not all ones: the checkpoint grows by one embedding matrix).
    online: for ``online_down``, each ``down_proj``'s input rotation by full module name,
      drawn as ``--rotate hadamard`` draws it (``layer_seed(seed, name)``); recorded only,
      the weights are left as they are for the caller to rotate and apply online.
    """

    seed: int
    family: str
    layers: int
    residual: Rotation
    head: Rotation
    residual_seed: int
    head_seed: int
    untied: bool
    online: dict[str, Rotation] = field(default_factory=dict)

    @property
    def residual_size(self) -> int:
        return self.residual.n

    @property
    def head_size(self) -> int:
        return self.head.n

    def as_dict(self) -> dict:
        """The report as plain values (sizes and seeds; the rotations are redrawn from them)."""
        return {
            "rotate": "folded+online" if self.online else "folded",
            "seed": self.seed,
            "family": self.family,
            "layers": self.layers,
            "residual_size": self.residual_size,
            "residual_seed": self.residual_seed,
            "head_size": self.head_size,
            "head_seed": self.head_seed,
            "untied_embeddings": self.untied,
            "online": {name: r.n for name, r in self.online.items()},
        }


@dataclass(frozen=True)
class FoldPlan:
    """Every module the fold touches, found (and the model accepted) before the first write."""

    family: str
    blocks: nn.ModuleList
    embed: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Linear
    head_dim: int
    tied: bool


def _fail(model_type: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"cannot fold rotations into this {model_type} model: {why}")


def _module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _is_rms_norm(module: nn.Module | None, size: int) -> bool:
    """An RMSNorm with a ``(size,)`` weight applied as ``x / rms(x) * weight`` (by class name:
    the families allowed here all name theirs ``<Family>RMSNorm``)."""
    weight = getattr(module, "weight", None)
    return (
        module is not None
        and type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (size,)
    )


def check_foldable(model: nn.Module, online_down: bool = False) -> FoldPlan:
    """Find every module the fold touches and refuse, in one line, a model it does not fit.

    Nothing is modified; :func:`fold_rotations` calls it before its first write.
    """
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", None) or type(model).__name__)
    if model_type in _REFUSED:
        raise _fail(model_type, _REFUSED[model_type])
    if model_type not in FOLD_FAMILIES:
        raise _fail(model_type, f"folded rotations support {', '.join(FOLD_FAMILIES)}")
    blocks = _module(model, "model.layers")
    embed = _module(model, "model.embed_tokens")
    final_norm = _module(model, "model.norm")
    lm_head = _module(model, "lm_head")
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise _fail(model_type, "no decoder blocks at model.layers")
    if not isinstance(embed, nn.Embedding) or not isinstance(lm_head, nn.Linear):
        raise _fail(model_type, "model.embed_tokens or lm_head is not a plain embedding/linear")
    n = embed.weight.shape[1]
    if not _is_rms_norm(final_norm, n):
        raise _fail(model_type, "model.norm is not an RMSNorm of the hidden size")
    head_dim = None
    for i, block in enumerate(blocks):
        for name in _READ_ATTN + _READ_MLP + _WRITERS:
            layer = _module(block, name)
            if type(layer) is not nn.Linear:  # a quantized or wrapped layer holds no float W
                raise _fail(model_type, f"block {i}'s {name} is not a float nn.Linear")
            if layer.weight.is_meta or not layer.weight.is_floating_point():
                raise _fail(model_type, f"block {i}'s {name} has no float weights in memory")
        for name in _NORMS:
            if not _is_rms_norm(_module(block, name), n):
                raise _fail(model_type, f"block {i}'s {name} is not an RMSNorm of size {n}")
        dim = getattr(block.self_attn, "head_dim", None)
        v, o = block.self_attn.v_proj, block.self_attn.o_proj
        if not isinstance(dim, int) or v.out_features % dim or o.in_features % dim:
            raise _fail(model_type, f"block {i}'s attention has no head_dim dividing v and o")
        if head_dim is not None and dim != head_dim:
            raise _fail(model_type, f"head_dim {dim} of block {i} differs from {head_dim}")
        head_dim = dim
        if online_down:
            _check_size(model_type, f"block {i}'s mlp.down_proj", block.mlp.down_proj.in_features)
    _check_size(model_type, "the hidden size", n)
    _check_size(model_type, "the head dimension", head_dim)
    if embed.weight.is_meta or lm_head.weight.is_meta:
        raise _fail(model_type, "the embeddings are not in memory")
    tied = lm_head.weight is embed.weight or (lm_head.weight.data_ptr() == embed.weight.data_ptr())
    return FoldPlan(model_type, blocks, embed, final_norm, lm_head, head_dim, tied)


def _check_size(model_type: str, what: str, size: int) -> None:
    try:
        split_size(int(size))
    except ValueError as exc:
        raise _fail(model_type, f"{what}: {exc}") from None


def _update_(
    weight: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], dim: int, step: int = 1
) -> None:
    """``weight <- fn(weight)`` a block of rows (``dim=0``) or columns (``dim=1``) at a time,
    each block read as float64 and written back once in the weight's dtype; blocks are whole
    multiples of ``step`` (a head's rows or columns)."""
    size, other = weight.shape[dim], weight.shape[1 - dim]
    rows = max(step, BLOCK_ELEMENTS // max(other, 1) // step * step)
    for a in range(0, size, rows):
        part = weight.narrow(dim, a, min(rows, size - a))
        part.copy_(fn(part.to(torch.float64)).to(weight.dtype))


def _read(layer: nn.Linear, rotation: Rotation, scale: torch.Tensor) -> None:
    """A reader of the stream behind a norm of scale ``g``: ``W <- W diag(g) R1``."""
    _update_(layer.weight, lambda W: rotation.apply(W * scale), 0)


def _write(layer: nn.Linear, rotation: Rotation) -> None:
    """A writer of the stream: ``W <- R1^T W`` (``(R1^T W)[:, J] = (W[:, J]^T R1)^T``)."""
    _update_(layer.weight, lambda W: rotation.apply(W.T).T, 1)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(rotation.apply(layer.bias.to(torch.float64)).to(layer.bias.dtype))


def _fold_block(block: nn.Module, r1: Rotation, r2: Rotation, head_dim: int) -> None:
    attn, mlp = block.self_attn, block.mlp
    d = head_dim
    g = block.input_layernorm.weight.to(torch.float64)
    _read(attn.q_proj, r1, g)
    _read(attn.k_proj, r1, g)

    def value(W: torch.Tensor) -> torch.Tensor:
        """Rows of whole KV heads: ``R2^T (W_v[h] diag(g) R1)``, ``R2^T X = (X^T R2)^T``."""
        X = r1.apply(W * g).reshape(-1, d, W.shape[1])
        return r2.apply(X.transpose(1, 2)).transpose(1, 2).reshape(W.shape)

    _update_(attn.v_proj.weight, value, 0, step=d)
    if attn.v_proj.bias is not None:
        b = attn.v_proj.bias
        b.copy_(r2.apply(b.to(torch.float64).view(-1, d)).reshape(-1).to(b.dtype))

    def output(W: torch.Tensor) -> torch.Tensor:
        """Columns of whole query heads: ``R1^T (W_o[:, i] R2)``."""
        X = r2.apply(W.reshape(W.shape[0], -1, d)).reshape(W.shape)
        return r1.apply(X.T).T

    _update_(attn.o_proj.weight, output, 1, step=d)
    if attn.o_proj.bias is not None:
        b = attn.o_proj.bias
        b.copy_(r1.apply(b.to(torch.float64)).to(b.dtype))

    g = block.post_attention_layernorm.weight.to(torch.float64)
    _read(mlp.gate_proj, r1, g)
    _read(mlp.up_proj, r1, g)
    _write(mlp.down_proj, r1)
    for name in _NORMS:
        getattr(block, name).weight.fill_(1.0)


def fold_rotations(model: nn.Module, seed: int, online_down: bool = False) -> FoldReport:
    """Fold the RMSNorm scales, a residual rotation ``R1`` and a head rotation ``R2`` into the
    weights of a Llama, Mistral, Qwen2 or Qwen3 causal LM, in place; the model computes the
    same function (up to rounding in its dtype) with every linear layer's weights rotated.

    seed: draws ``R1`` (hidden_size) and ``R2`` (head_dim), randomised Hadamard matrices
    (:func:`latticequant.core.rotation.hadamard_rotation`). Tied embeddings whose final norm is
    not all ones are untied (``lm_head`` reads ``E diag(g) R1``, the embedding is ``E R1``) and
    ``config.tie_word_embeddings`` set to False. online_down: also draw, for each
    ``down_proj``, the Hadamard rotation of its input that a reader would apply online
    (recorded in the report, not applied). Any other family is refused in one line before
    anything is modified.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the rotation seed must be a non-negative integer, got {seed!r}")
    plan = check_foldable(model, online_down)
    n = plan.embed.weight.shape[1]
    residual_seed, head_seed = layer_seed(seed, "residual"), layer_seed(seed, "head")
    r1 = hadamard_rotation(n, residual_seed)
    r2 = hadamard_rotation(plan.head_dim, head_seed)
    with torch.no_grad():
        g = plan.final_norm.weight.to(plan.lm_head.weight.device, torch.float64)
        untie = plan.tied and not bool((g == 1).all())
        if untie:
            plan.lm_head.weight = nn.Parameter(
                plan.embed.weight.detach().clone(), requires_grad=plan.embed.weight.requires_grad
            )
            _untie_config(model)
        _update_(plan.embed.weight, _on(r1, plan.embed.weight.device).apply, 0)
        if not plan.tied or untie:  # still tied: one tensor, E R1, is what both read
            _read(plan.lm_head, _on(r1, plan.lm_head.weight.device), g)
        plan.final_norm.weight.fill_(1.0)
        for block in plan.blocks:
            device = block.self_attn.q_proj.weight.device  # blocks may sit on several devices
            _fold_block(block, _on(r1, device), _on(r2, device), plan.head_dim)
    online = {}
    if online_down:
        prefix = "model.layers"
        for i, block in enumerate(plan.blocks):
            name = f"{prefix}.{i}.mlp.down_proj"
            online[name] = hadamard_rotation(
                block.mlp.down_proj.in_features, layer_seed(seed, name)
            )
    report = FoldReport(
        seed=seed,
        family=plan.family,
        layers=len(plan.blocks),
        residual=r1,
        head=r2,
        residual_seed=residual_seed,
        head_seed=head_seed,
        untied=untie,
        online=online,
    )
    log.info(
        "folded rotations into %d %s blocks: R1 %d, R2 %d%s",
        report.layers,
        report.family,
        report.residual_size,
        report.head_size,
        ", lm_head untied from the embeddings" if untie else "",
    )
    return report


def _on(rotation: Rotation, device: torch.device) -> Rotation:
    """The rotation's signs and factor where the weights are (they are drawn on the CPU)."""
    return dataclasses.replace(
        rotation, signs=rotation.signs.to(device), factor=rotation.factor.to(device)
    )


def _untie_config(model: nn.Module) -> None:
    """Say in the config that lm_head has its own weight, so it is saved and loaded apart."""
    configs = [model.config]
    text = getattr(model.config, "get_text_config", None)
    if callable(text) and text() is not model.config:
        configs.append(text())
    for config in configs:
        config.tie_word_embeddings = False
    # transformers keeps the tied names it found at construction; a save or a later
    # ``tie_weights()`` would otherwise drop lm_head or share it with the embedding again
    for module in model.modules():
        keys = getattr(module, "all_tied_weights_keys", None)
        if isinstance(keys, dict):
            for key in [k for k in keys if k.endswith("lm_head.weight")]:
                del keys[key]
