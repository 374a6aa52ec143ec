"""The ``gguf`` format: a linear layer on the exact grid of one of llama.cpp's types.

The grid of every block is chosen first, as llama.cpp chooses it (:func:`fit_grid`, weighted by
the Hessian's diagonal, llama.cpp's importance matrix), except ``Q2_0``, whose llama.cpp fit
ignores that weight and wastes a level (:func:`fit_q2_0` searches its scale instead); the
method then decodes the codes on that fixed grid with error feedback
(:meth:`GgufFormat.layer_grid` hands it the real scales and offsets), and
:meth:`GgufFormat.pack` writes the type's blocks byte for byte. Which type a layer
gets follows llama.cpp's mix of the file type (``--gguf-type``): :meth:`GgufFormat.for_model`
binds the format to a model's tensors. The layers go into one ``.gguf`` file (``container``), not
a checkpoint folder.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from latticequant.formats.gguf.blocks import pack as pack_blocks
from latticequant.formats.gguf.blocks import unpack as unpack_blocks
from latticequant.formats.gguf.mix import (
    FileType,
    ModelShape,
    fallback,
    fallbacks,
    tensor_types,
)
from latticequant.formats.gguf.reference import fit_grid
from latticequant.formats.gguf.types import (
    GGMLType,
    GgufGrid,
    codebook,
    dequantize,
    scales_offsets,
)
from latticequant.formats.gguf.types import type_info as _type_info
from latticequant.formats.gguf.weighted_fit import fit_q2_0
from latticequant.formats.packing import FormatError
from latticequant.formats.protocol import (
    Format,
    LayerGrid,
    UnsupportedConfigError,
    register_format,
)

__all__ = [
    "GGUF_TYPES",
    "GGUF_ARCHITECTURES",
    "GgufFormat",
    "check_gguf_config",
    "check_gguf_type",
    "gemma3_attention_scale",
    "gguf_tensor_name",
    "llama_gguf_shapes",
    "rope_scaling",
    "rope_thetas",
    "text_config",
    "GGUF",
]

#: The ``--gguf-type`` names: llama.cpp's own file types, exactly as ``llama-quantize`` spells
#: them.
GGUF_TYPES = (
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_0",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_0",
    "IQ4_NL",
    "Q3_K_M",
    "Q3_K_S",
    "Q2_K",
    "Q2_0",
)

#: Hugging Face ``model_type`` -> GGUF ``general.architecture`` (Mistral is written as Llama,
#: as llama.cpp's converter does; Gemma 3 with images is written as its text model, the vision
#: tower being a separate file for llama.cpp).
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}

#: A tiny scale standing for a group whose levels are one value (``d = 0`` or ``sc = 0``): its
#: offset makes ``s * (z - o)`` that value to float64 rounding, whatever the code.
DEGENERATE_SCALE = 1e-20

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def check_gguf_type(name: str | None) -> str:
    """``name`` when it is one of :data:`GGUF_TYPES`; one line listing them otherwise."""
    if name not in GGUF_TYPES:
        raise UnsupportedConfigError(
            f"unknown --gguf-type {name!r}; valid: {', '.join(GGUF_TYPES)}"
        )
    return name


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a decoder linear layer (``model.layers.3.mlp.down_proj`` ->
    ``blk.3.ffn_down.weight``); None for a name outside the llama family's blocks."""
    parts = hf_name.split(".")
    for i, part in enumerate(parts):
        if part == "layers" and i + 1 < len(parts) and parts[i + 1].isdigit():
            local = ".".join(parts[i + 2 :])
            if local in _LAYER_NAMES:
                return f"blk.{parts[i + 1]}.{_LAYER_NAMES[local]}.weight"
    return None


def text_config(config):
    """The config of the text model (a Gemma 3 with images keeps it in ``text_config``)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def rope_thetas(config) -> tuple[float, float | None]:
    """The rope bases of full-attention layers and (None when the config has none) of
    sliding-window layers, from transformers 5's ``rope_parameters`` (per layer type for Gemma
    3) or the older ``rope_theta`` / ``rope_local_base_freq``."""
    params = getattr(config, "rope_parameters", None) or {}
    full = params.get("full_attention", params)
    theta = full.get("rope_theta", getattr(config, "rope_theta", None))
    local = (params.get("sliding_attention") or {}).get(
        "rope_theta", getattr(config, "rope_local_base_freq", None)
    )
    return float(10000.0 if theta is None else theta), None if local is None else float(local)


def rope_scaling(config) -> tuple[dict, dict]:
    """The rope scaling of full-attention and of sliding-window layers (``{}``: none)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        full, sliding = params["full_attention"], params.get("sliding_attention") or {}
    else:
        full, sliding = params or getattr(config, "rope_scaling", None) or {}, {}

    def scaled(p: dict) -> dict:
        return {} if p.get("rope_type", p.get("type", "default")) == "default" else p

    return scaled(full), scaled(sliding)


def gemma3_attention_scale(config) -> float:
    """The ``query_pre_attn_scalar`` llama.cpp assumes for Gemma 3 (it stores none): the
    hidden size per head for the 62-layer (27B) model, the head size otherwise."""
    if int(config.num_hidden_layers) == 62:
        return int(config.hidden_size) / int(config.num_attention_heads)
    return float(config.head_dim)


def check_gguf_config(config) -> None:
    """Refuse, in one line, a model whose architecture a GGUF file cannot describe to
    llama.cpp: an architecture not written here, and the Gemma 3 settings llama.cpp's
    ``gemma3`` graph does not read (it fixes them itself)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise UnsupportedConfigError(
            f"architecture {model_type!r} cannot be written to GGUF here; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    if GGUF_ARCHITECTURES[model_type] != "gemma3":
        return
    text = text_config(config)
    problems = []
    act = getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation {act!r} (llama.cpp runs gelu_pytorch_tanh)")
    if getattr(text, "attn_logit_softcapping", None) is not None:
        problems.append("attn_logit_softcapping (llama.cpp's gemma3 has none)")
    if getattr(text, "use_bidirectional_attention", False):
        problems.append("bidirectional attention (llama.cpp's gemma3 is causal)")
    scalar = float(getattr(text, "query_pre_attn_scalar", gemma3_attention_scale(text)))
    if scalar != gemma3_attention_scale(text):
        problems.append(
            f"query_pre_attn_scalar {scalar:g} (llama.cpp scales queries by "
            f"{gemma3_attention_scale(text):g}^-1/2 for this shape)"
        )
    kinds = set(getattr(text, "layer_types", None) or ())
    if kinds - {"sliding_attention", "full_attention"}:
        problems.append(f"layer types {sorted(kinds)}")
    full, sliding = rope_scaling(text)
    if full and (full.get("rope_type", full.get("type")) != "linear" or "factor" not in full):
        problems.append(f"rope scaling {full.get('rope_type', full.get('type'))!r} (linear only)")
    if sliding:
        problems.append("rope scaling on sliding-window layers")
    if problems:
        raise UnsupportedConfigError(
            "this Gemma 3 cannot be written to GGUF: llama.cpp does not read " + "; ".join(problems)
        )


def llama_gguf_shapes(config) -> tuple[dict[str, tuple[int, ...]], ModelShape]:
    """The GGUF tensors (names and ``ne``) of a llama-family Hugging Face ``config`` and the
    :class:`ModelShape` llama.cpp's mix reads."""
    from latticequant.formats.gguf.mix import llama_tensor_shapes

    arch = GGUF_ARCHITECTURES.get(getattr(config, "model_type", None), "llama")
    config = text_config(config)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    shapes = llama_tensor_shapes(
        n_layer=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        intermediate=int(config.intermediate_size),
        n_head=n_head,
        n_head_kv=n_kv,
        head_dim=head_dim,
        vocab=int(config.vocab_size),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )
    shape = ModelShape(
        n_layer=int(config.num_hidden_layers), n_head=n_head, n_head_kv=n_kv, arch=arch
    )
    return shapes, shape


def _gguf_type_of_ftype(ftype: str, d_in: int) -> GGMLType:
    """The type a layer of ``d_in`` columns gets from the file type's default (fallback
    included)."""
    return fallback(FileType[ftype].default_type, d_in)


class GgufFormat(Format):
    """One linear layer as one GGUF tensor of a llama.cpp type (see the module docstring).

    file_type: the ``--gguf-type`` (a llama.cpp file type); types: GGUF tensor name -> the type
    llama.cpp's mix gives it (set by :meth:`for_model`); without them every layer takes the
    file type's default type.
    """

    name = "gguf"
    keys = ("gguf_blocks", "gguf_type", "gguf_shape")
    key_kinds = {"gguf_blocks": "codes", "gguf_type": "meta", "gguf_shape": "meta"}
    quant_method = "gguf"
    container = "gguf"
    fixes_grid = True

    def __init__(
        self, file_type: str | None = None, types: Mapping[str, GGMLType | None] | None = None
    ) -> None:
        self.file_type = file_type
        self.types = dict(types or {})
        self.fallbacks: dict[str, tuple[GGMLType, GGMLType]] = {}  # set by for_model

    # -- binding to a run and a model --------------------------------------------------------

    def for_model(self, config, options: Mapping) -> GgufFormat:
        ftype = check_gguf_type(options.get("gguf_type"))
        check_gguf_config(config)
        shapes, shape = llama_gguf_shapes(config)
        # the grids are fitted with an importance matrix (the Hessian's diagonal): the mix is
        # llama-quantize's with --imatrix
        bound = GgufFormat(ftype, tensor_types(ftype, shapes, shape, imatrix=True))
        bound.fallbacks = fallbacks(ftype, shapes, shape, imatrix=True)
        return bound

    def run_notes(self) -> list[str]:
        line = self.fallback_summary()
        return [line] if line else []

    def fallback_summary(self) -> str:
        """One line: how many tensors fell back from which type to which, and why (their rows
        are not a multiple of the type's block), as llama-quantize does; "" when none did."""
        counts: dict[tuple[GGMLType, GGMLType], int] = {}
        for chosen, final in self.fallbacks.values():
            counts[(chosen, final)] = counts.get((chosen, final), 0) + 1
        if not counts:
            return ""
        parts = [f"{n} {a.name} -> {b.name}" for (a, b), n in sorted(counts.items())]
        total = sum(counts.values())
        return (
            f"GGUF {self.file_type}: {total} tensor{'s' if total > 1 else ''} fell back to "
            "block-32 types "
            f"as llama-quantize does (rows not a multiple of the type's block): {', '.join(parts)}"
        )

    def layer_type(self, name: str, d_in: int) -> GGMLType:
        """The type of layer ``name`` (its Hugging Face name) of ``d_in`` columns."""
        if self.file_type is None:
            raise UnsupportedConfigError(
                "the gguf format needs a file type: --gguf-type TYPE (valid: "
                f"{', '.join(GGUF_TYPES)})"
            )
        t = self.types.get(gguf_tensor_name(name) or "")
        return _gguf_type_of_ftype(self.file_type, d_in) if t is None else GGMLType(t)

    # -- what the grid can represent ---------------------------------------------------------

    def check(self, config, d_out: int | None = None, d_in: int | None = None) -> None:
        if "scales" in (getattr(config, "refine_steps", None) or ()):
            raise UnsupportedConfigError(
                "--refine scales re-solves a uniform grid's scales; a GGUF type's scales are "
                "fixed by its block fit: use --refine cd"
            )
        if not getattr(config, "clip", True):
            raise UnsupportedConfigError(
                "--no-clip leaves codes off the grid, which a GGUF type cannot store"
            )
        if getattr(config, "scale_method", "minmax") != "minmax":
            raise UnsupportedConfigError(
                f"--scale-method {config.scale_method}: a GGUF type's block scales are fitted "
                "as llama.cpp fits them, weighted by the Hessian's diagonal already; leave it out"
            )
        if not getattr(config, "static_groups", True):
            raise UnsupportedConfigError(
                "a GGUF grid is fixed per block before the decode: use --static-groups"
            )
        if self.file_type is not None and d_in is not None:
            t = _gguf_type_of_ftype(self.file_type, int(d_in))
            if t in (GGMLType.F16, GGMLType.F32):
                raise UnsupportedConfigError(
                    f"d_in={d_in} is not a multiple of 32, which every GGUF block needs; skip "
                    "this layer (--skip)"
                )

    def layer_grid(self, W: torch.Tensor, H: torch.Tensor, config, name: str) -> LayerGrid:
        """llama.cpp's grid for ``W`` (importance: the diagonal of ``H``; Q2_0: :func:`fit_q2_0`
        on the same weights), as the real scales
        and offsets a core decoder takes, the layer's config (bits and group of the type) and
        the packing of the decoded codes into the type's blocks."""
        d_out, d_in = W.shape
        t = self.layer_type(name, d_in)
        if t in (GGMLType.F16, GGMLType.F32):
            raise UnsupportedConfigError(f"{name}: llama.cpp leaves this tensor in {t.name}")
        info = _type_info(t)
        importance = torch.diagonal(H).to(torch.float32).clamp(min=0).cpu().numpy()
        fit = fit_q2_0 if t == GGMLType.Q2_0 else lambda W, h: fit_grid(t, W, h)
        grid = fit(W.detach().to(torch.float32).cpu().numpy(), importance)
        s, o = grid_scales_offsets(grid)
        cfg = config.replace(bits=int(info.maxq).bit_length(), group_size=info.group_size)
        S = torch.from_numpy(s).to(W.dtype).to(W.device)
        Z = torch.from_numpy(o).to(W.dtype).to(W.device)
        book = codebook(t)  # IQ4_NL: its 16 levels, a one-dimensional lattice like any other
        L = None if book is None else torch.from_numpy(book).to(W.dtype).to(W.device)

        def pack(result) -> dict[str, torch.Tensor]:
            return self.pack_codes(result.codes, grid)

        return LayerGrid(config=cfg, scales=S, zeros=Z, pack=pack, kind=t.name, levels=L)

    # -- tensors -----------------------------------------------------------------------------

    def pack(self, result) -> dict[str, torch.Tensor]:
        raise FormatError(
            "the gguf format packs codes on its own grid: use layer_grid(...).pack(result)"
        )

    @staticmethod
    def pack_codes(codes, grid: GgufGrid) -> dict[str, torch.Tensor]:
        """The tensors of codes on a GGUF grid: the type's blocks, the type's id, the shape."""
        codes = codes.cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        data = pack_blocks(codes, grid)
        return {
            "gguf_blocks": torch.from_numpy(np.ascontiguousarray(data)),
            "gguf_type": torch.tensor(int(grid.qtype), dtype=torch.int32),
            "gguf_shape": torch.tensor(list(grid.shape), dtype=torch.int64),
        }

    def unpack(self, tensors, meta):
        t = GGMLType(int(tensors["gguf_type"]))
        codes, grid = unpack_blocks(t, tensors["gguf_blocks"].cpu().numpy())
        shape = tuple(int(n) for n in tensors["gguf_shape"].tolist())
        if grid.shape != shape:
            raise FormatError(f"gguf blocks give shape {grid.shape}, expected {shape}")
        return codes, grid

    def dequantize(self, tensors, meta, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes, grid = self.unpack(tensors, meta)
        return torch.from_numpy(dequantize(codes, grid)).to(dtype)

    def effective_bits(self, tensors, n_weights: int) -> float:
        return 8.0 * tensors["gguf_blocks"].numel() / max(1, n_weights)

    def file_config(self, base, meta) -> dict:
        return {"quant_method": "gguf", "gguf_type": self.file_type}


def grid_scales_offsets(grid: GgufGrid) -> tuple[np.ndarray, np.ndarray]:
    """:func:`scales_offsets` with every group of a single value (scale 0) given the tiny scale
    :data:`DEGENERATE_SCALE` and the offset that puts its levels on that value: the decoders
    then feed back that value's error, whatever code they pick."""
    s, o = scales_offsets(grid)
    flat = s == 0
    if flat.any():
        from latticequant.formats.gguf.types import levels

        value = levels(grid)[..., 0].astype(np.float64)
        s = np.where(flat, DEGENERATE_SCALE, s)
        o = np.where(flat, -value / DEGENERATE_SCALE, o)
    return s, o


GGUF = register_format(GgufFormat())
