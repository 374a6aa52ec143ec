"""Hugging Face causal LMs: where their decoder blocks and linear layers are.

Each supported architecture is described declaratively by the path of its list of decoder
blocks and its linear layers grouped in true-sequential order (the layers of one group read the
same input; a group's input depends on the groups before it). Models not described get a generic
walk: the largest ``nn.ModuleList`` of identical blocks, every linear layer its own group.

Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) are described block by block, since
their blocks differ (dense MLPs in some, experts in others): attention as in Llama, then every
expert's ``gate_proj``/``up_proj`` in one stage and every ``down_proj`` in the next (experts are
independent of each other), a shared expert with them; routers stay in float. Their fused expert
tensors must first be split (:func:`latticequant.pipeline.experts.unfuse_experts`); a model that
still holds fused expert tensors, of these families or any other, is refused rather than left
half in float.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from latticequant.pipeline.experts import RoutedExperts, fused_expert_tensors

log = logging.getLogger(__name__)

__all__ = [
    "Architecture",
    "ModelLayout",
    "UnsupportedModelError",
    "ARCHITECTURES",
    "describe_model",
    "linear_weight",
    "set_linear_weight",
    "is_linear",
]


class UnsupportedModelError(ValueError):
    """A model whose decoder blocks and linear layers cannot be found."""


@dataclass(frozen=True)
class Architecture:
    """Where one family keeps its blocks, and its linear layers in true-sequential groups.

    transposed: the layers are GPT-2 ``Conv1D`` (weight stored as ``(d_in, d_out)``).
    """

    name: str
    blocks: str
    subsets: tuple[tuple[str, ...], ...]
    transposed: bool = False
    moe: bool = False  # subsets per block: attention, then the block's MLP or its experts


_LLAMA_SUBSETS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "model.layers", _LLAMA_SUBSETS),
    "mistral": Architecture("mistral", "model.layers", _LLAMA_SUBSETS),
    "qwen2": Architecture("qwen2", "model.layers", _LLAMA_SUBSETS),
    "qwen3": Architecture("qwen3", "model.layers", _LLAMA_SUBSETS),
    "opt": Architecture(
        "opt",
        "model.decoder.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    "mixtral": Architecture("mixtral", "model.layers", _LLAMA_SUBSETS[:2], moe=True),
    "qwen2_moe": Architecture("qwen2_moe", "model.layers", _LLAMA_SUBSETS[:2], moe=True),
    "qwen3_moe": Architecture("qwen3_moe", "model.layers", _LLAMA_SUBSETS[:2], moe=True),
    "gpt2": Architecture(
        "gpt2",
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        transposed=True,
    ),
}

MOE_FAMILIES = tuple(sorted(name for name, arch in ARCHITECTURES.items() if arch.moe))


@dataclass
class ModelLayout:
    """The decoder blocks of one model instance and the linear groups inside each block."""

    architecture: str
    block_path: str
    blocks: nn.ModuleList
    subsets: tuple[tuple[str, ...], ...]
    block_subsets: tuple[tuple[tuple[str, ...], ...], ...] | None = (
        None  # per block, if they differ
    )

    def block_name(self, index: int) -> str:
        return f"{self.block_path}.{index}"

    def subsets_of(self, index: int) -> tuple[tuple[str, ...], ...]:
        """The linear groups of block ``index``."""
        return self.subsets if self.block_subsets is None else self.block_subsets[index]

    def linear_names(self) -> list[str]:
        """Full module names of every linear layer that is quantized, block by block."""
        return [
            f"{self.block_name(i)}.{name}"
            for i in range(len(self.blocks))
            for subset in self.subsets_of(i)
            for name in subset
        ]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """A layer with a 2-D weight that the quantizers handle (``nn.Linear`` or GPT-2 Conv1D)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(d_out, d_in)``, whatever the layer stores."""
    if _is_conv1d(module):
        return module.weight.t()
    return module.weight


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write a ``(d_out, d_in)`` weight back in the layer's own layout, in place."""
    with torch.no_grad():
        target = module.weight
        source = weight.t() if _is_conv1d(module) else weight
        if source.shape != target.shape:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit layer of weight "
                f"{tuple(target.shape)}"
            )
        target.copy_(source.to(target.dtype))


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _generic_layout(model: nn.Module) -> ModelLayout:
    """The largest ``ModuleList`` of same-class blocks holding linear layers."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > best[0]:
            best = (len(module), name, module)
    if best is None:
        raise UnsupportedModelError(
            f"unsupported model {type(model).__name__}: no list of decoder blocks with linear "
            f"layers found (known architectures: {', '.join(sorted(ARCHITECTURES))})"
        )
    _, path, blocks = best
    names = [name for name, m in blocks[0].named_modules() if name and is_linear(m)]
    log.info("generic layout for %s: %d blocks at %s", type(model).__name__, len(blocks), path)
    return ModelLayout("generic", path, blocks, tuple((name,) for name in names))


def _mlp_subsets(block: nn.Module) -> tuple[tuple[str, ...], ...]:
    """A MoE family's MLP stages in one block: its experts (and shared expert), or a dense MLP."""
    mlp = block.get_submodule("mlp")
    experts = getattr(mlp, "experts", None)
    if isinstance(experts, RoutedExperts):
        up = [f"mlp.experts.{e}.{n}" for e in range(len(experts)) for n in ("gate_proj", "up_proj")]
        down = [f"mlp.experts.{e}.down_proj" for e in range(len(experts))]
        if is_linear(_get_submodule(block, "mlp.shared_expert.down_proj") or nn.Identity()):
            up += ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"]
            down += ["mlp.shared_expert.down_proj"]
        return (tuple(up), tuple(down))
    return _LLAMA_SUBSETS[2:]


def _refuse_fused_experts(blocks: nn.ModuleList, model_type: str | None = None) -> None:
    for i, block in enumerate(blocks):
        fused = fused_expert_tensors(block)
        if fused and model_type in MOE_FAMILIES:
            raise UnsupportedModelError(
                f"block {i} of this {model_type} model still holds fused experts "
                f"({', '.join(fused[:2])}): in Python call "
                "latticequant.pipeline.experts.unfuse_experts(model) first (quantize and "
                "load_model(..., offload=True) do it)"
            )
        if fused:
            raise UnsupportedModelError(
                f"block {i} stores experts as fused tensors ({', '.join(fused[:2])}) that cannot "
                "be quantized as layers; the mixture-of-experts families supported are "
                f"{', '.join(MOE_FAMILIES)}"
            )


def describe_model(model: nn.Module) -> ModelLayout:
    """Find the decoder blocks and their linear groups, declaratively when the family is known."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch nn.Module, got {type(model).__name__}")
    layout = _describe(model)
    _refuse_fused_experts(
        layout.blocks, getattr(getattr(model, "config", None), "model_type", None)
    )
    return layout


def _describe(model: nn.Module) -> ModelLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is not None and arch.moe:
        blocks = _get_submodule(model, arch.blocks)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            _refuse_fused_experts(blocks, model_type)
            per_block = tuple(arch.subsets + _mlp_subsets(b) for b in blocks)
            missing = [
                f"{i}.{name}"
                for i, subsets in enumerate(per_block)
                for subset in subsets
                for name in subset
                if not is_linear(_get_submodule(blocks[i], name) or nn.Identity())
            ]
            if not missing:
                return ModelLayout(arch.name, arch.blocks, blocks, per_block[0], per_block)
            log.warning("%s model lacks %s; falling back to the generic walk", model_type, missing)
    elif arch is not None:
        blocks = _get_submodule(model, arch.blocks)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            missing = [
                name
                for subset in arch.subsets
                for name in subset
                if not is_linear(_get_submodule(blocks[0], name) or nn.Identity())
            ]
            if not missing:
                return ModelLayout(arch.name, arch.blocks, blocks, arch.subsets)
            log.warning("%s model lacks %s; falling back to the generic walk", model_type, missing)
        else:
            log.warning(
                "%s model has no blocks at %s; using the generic walk", model_type, arch.blocks
            )
    return _generic_layout(model)
