"""Mixture-of-experts blocks: fused expert tensors become one linear layer per expert matrix.

transformers 5 stores the experts of Mixtral, Qwen2-MoE and Qwen3-MoE fused, as two 3-D
parameters per block: ``experts.gate_up_proj`` ``(E, 2 I, H)`` and ``experts.down_proj``
``(E, H, I)``. Each expert's slices are the matrices the quantizer must see as layers, each with
the Hessian of the tokens the router sends to that expert. :func:`unfuse_experts` replaces such a
module by :class:`RoutedExperts`, a list of :class:`ExpertMLP` (``experts.{e}.gate_proj``,
``up_proj``, ``down_proj``, plain ``nn.Linear``) whose forward is the model's own routing loop,
so the calibration forward routes exactly as the model does and each expert's linear layers only
ever see their routed tokens. The routers (``mlp.gate``, Qwen2-MoE's ``shared_expert_gate``)
are not in the layout and stay in float.

An expert the calibration text rarely reaches has a Hessian from a handful of tokens, or none.
:class:`ExpertPolicy` says what it is quantized on when it received fewer than ``min_tokens``
routed tokens (over all ranks): ``all-tokens`` (the Hessian of every token of the block, as if
all were routed to it), ``rtn`` (an identity Hessian: for the GPTQ family, round to nearest) or
``float`` (kept in float, recorded). The choice is written into each expert layer's stats.

With the float-outputs objective an expert layer answers for the tokens the *quantized* router
sends it; :func:`expert_layer_input` gives the float block's input of that layer on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "FUSED_EXPERTS",
    "EXPERT_FALLBACKS",
    "ExpertPolicy",
    "ExpertMLP",
    "RoutedExperts",
    "unfuse_experts",
    "fused_expert_tensors",
    "has_experts",
    "expert_of",
    "experts_of",
    "routed_input",
    "expert_layer_input",
]

FUSED_EXPERTS = ("MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts")
"""transformers classes of fused experts that :func:`unfuse_experts` knows."""

EXPERT_FALLBACKS = ("all-tokens", "rtn", "float")


@dataclass(frozen=True)
class ExpertPolicy:
    """What an expert with fewer than ``min_tokens`` routed calibration tokens is quantized on.

    min_tokens: routed tokens an expert needs for its own Hessian (over all ranks); an expert
        with none always falls back, whatever this says.
    fallback: "all-tokens" (every token of the block), "rtn" (an identity Hessian) or "float"
        (the expert stays in float, said in the log and the report).
    """

    min_tokens: int = 16
    fallback: str = "all-tokens"

    def __post_init__(self) -> None:
        m = self.min_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"--min-expert-tokens must be a non-negative integer, got {m!r}")
        if self.fallback not in EXPERT_FALLBACKS:
            raise ValueError(
                f"--expert-fallback must be one of {', '.join(EXPERT_FALLBACKS)}, "
                f"got {self.fallback!r}"
            )

    def falls_back(self, n_tokens: int) -> bool:
        return n_tokens < max(self.min_tokens, 1)


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` with plain linear layers.

    ``routed_tokens`` holds, while the expert runs inside :class:`RoutedExperts`, the flat
    indices of the block's tokens it was given (so a hook can place its inputs in their
    windows)."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype, device=None) -> None:
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn
        self.routed_tokens: torch.Tensor | None = None

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """The input of ``down_proj`` for tokens ``x``."""
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.intermediate(x))


class RoutedExperts(nn.ModuleList):
    """The experts of one block as a list of :class:`ExpertMLP`, called as the fused module was:
    ``(hidden_states (N, H), top_k_index (N, k), top_k_weights (N, k))`` -> ``(N, H)``.

    The loop is transformers' eager one: each expert that any token chose runs on its tokens,
    its output weighted by the router and added at their rows. ``last_input`` keeps the latest
    ``hidden_states`` while ``keep_input`` is set (the all-tokens fallback reads it)."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.keep_input = False
        self.last_input: torch.Tensor | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        n = len(self)
        if self.keep_input:
            self.last_input = hidden_states
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            chosen = nn.functional.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            hit = torch.greater(chosen.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit[:, 0].tolist():
            if index == n:
                continue
            top_k_pos, tokens = torch.where(chosen[index])
            expert = self[index]
            expert.routed_tokens = tokens
            try:
                y = expert(hidden_states[tokens])
            finally:
                expert.routed_tokens = None
            y = y * top_k_weights[tokens, top_k_pos, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _unfused(fused: nn.Module) -> RoutedExperts:
    gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] != 2 * down.shape[2]:
        raise ValueError(
            f"{type(fused).__name__} has experts of shapes {tuple(gate_up.shape)} and "
            f"{tuple(down.shape)}, not (E, 2I, H) and (E, H, I)"
        )
    n, two_i, hidden = gate_up.shape
    inter = two_i // 2
    experts = []
    for e in range(n):
        expert = ExpertMLP(hidden, inter, fused.act_fn, gate_up.dtype, gate_up.device)
        if gate_up.device.type == "meta":  # a model whose blocks wait on disk: names only
            experts.append(expert)
            continue
        with torch.no_grad():  # gate first, then up: the order of ``.chunk(2, dim=-1)``
            expert.gate_proj.weight.copy_(gate_up[e, :inter])
            expert.up_proj.weight.copy_(gate_up[e, inter:])
            expert.down_proj.weight.copy_(down[e])
        experts.append(expert)
    return RoutedExperts(experts)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` by :class:`RoutedExperts`, in place;
    returns how many were replaced (0 for a dense model, and when done already).

    Fused tensors on ``meta`` (a model loaded with its blocks on disk) give experts on
    ``meta``: the block store reads each expert's matrices from the files, as the per-expert
    tensors they hold or as slices of fused ones (:mod:`latticequant.pipeline.offload`)."""
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ in FUSED_EXPERTS]
    for name, fused in targets:
        _set_module(model, name, _unfused(fused))
    return len(targets)


def fused_expert_tensors(module: nn.Module) -> list[str]:
    """Parameters of ``module`` that hold several experts' matrices at once (3-D or more, in a
    module whose class or name speaks of experts): what no layout can quantize as layers."""
    found = []
    for name, sub in module.named_modules():
        if "expert" not in name.lower() and "expert" not in type(sub).__name__.lower():
            continue
        for pname, p in sub.named_parameters(recurse=False):
            if p.dim() >= 3:
                found.append(f"{name}.{pname}" if name else pname)
    return found


def has_experts(block: nn.Module) -> bool:
    return any(isinstance(m, RoutedExperts) for m in block.modules())


def expert_of(block: nn.Module, name: str) -> ExpertMLP | None:
    """The expert a layer of ``block`` belongs to (``...experts.3.up_proj``), else None."""
    parent = name.rpartition(".")[0]
    if not parent:
        return None
    owner = block.get_submodule(parent)
    return owner if isinstance(owner, ExpertMLP) else None


def experts_of(block: nn.Module, name: str) -> RoutedExperts:
    """The :class:`RoutedExperts` that holds the expert layer ``name``."""
    container = name.rpartition(".")[0].rpartition(".")[0]
    module = block.get_submodule(container)
    if not isinstance(module, RoutedExperts):
        raise ValueError(f"{name} is not a layer of routed experts")
    return module


def expert_layer_input(
    expert: ExpertMLP, name: str, x: torch.Tensor, tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """What the expert's layer ``name`` reads when the expert is given the rows ``tokens`` of
    its experts' input ``x`` (all rows when None): the rows themselves for ``gate_proj`` and
    ``up_proj``, the expert's intermediate on them for ``down_proj``. Called on the float
    block's expert with the quantized router's tokens, it is the float input the float-outputs
    objective pairs with the quantized one (both blocks' routings differ; the quantized one
    decides which tokens the layer answers for)."""
    rows = x if tokens is None else x[tokens]
    return expert.intermediate(rows) if name.endswith("down_proj") else rows


def routed_input(
    expert: ExpertMLP | None, x: torch.Tensor, windows: tuple[int, int], mask
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An expert layer's input placed back in its windows: ``(B, T, d)`` zeros with the routed
    tokens' rows filled in, and the mask of those rows (and of the block's own mask), so the
    Hessian is summed window by window like every other layer's. Other layers: as given, but
    flattened ``(B * T, d)`` inputs (a shared expert's) as ``(B, T, d)``."""
    tokens = None if expert is None else expert.routed_tokens
    B, T = windows
    if tokens is None:  # inputs an MoE block flattens to (B * T, d) get their windows back
        if x.dim() == 2 and x.shape[0] == B * T:
            x = x.view(B, T, -1)
        return x, mask
    full = x.new_zeros(B * T, x.shape[-1])
    full[tokens] = x.reshape(-1, x.shape[-1])
    keep = torch.zeros(B * T, dtype=torch.bool, device=x.device)
    keep[tokens] = True
    if mask is not None:
        keep &= mask.reshape(-1).to(device=x.device, dtype=torch.bool)
    return full.view(B, T, -1), keep.view(B, T)
