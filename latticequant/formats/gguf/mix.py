"""llama.cpp's type mix: the GGML type of every tensor of a file type (``llama-quantize``'s
choice, ``llama_tensor_get_type`` in src/llama-quant.cpp).

A file type (ftype) names a default type (``llama_ftype_get_default_type``) and a set of rules
that give some tensors more bits: ``attn_v`` and ``ffn_down`` in the layers ``use_more_bits``
picks (the first and last eighth and every third layer between), the output matrix (Q6_K), the
first ``attn_v`` layers of Q3_K_M and Q4_K_S, ... Then comes the fallback of
``tensor_type_fallback``: a type whose block does not divide a row (``ne[0]``, the layer's
``d_in``) is replaced by a block-32 type (Q2_K, Q3_K, Q2_0 -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1;
Q6_K -> Q8_0; IQ4_XS and the IQ 256-types -> IQ4_NL), and by F16 when 32 does not divide it
either. Embeddings tied to the output (no ``output.weight``) are typed as the output.

Tensors are visited in llama.cpp's order (by layer, then by name), which the counters of
``attn_v`` and ``ffn_down`` layers depend on. Without an importance matrix unless told.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from latticequant.formats.gguf.types import TYPES
from latticequant.formats.gguf.types import GGMLType as T


class FileType(Enum):
    """``enum llama_ftype`` (include/llama.h) of the file types whose mix is implemented: value
    ``(id, default type)``."""

    Q4_0 = (2, T.Q4_0)
    Q4_1 = (3, T.Q4_1)
    Q8_0 = (7, T.Q8_0)
    Q5_0 = (8, T.Q5_0)
    Q5_1 = (9, T.Q5_1)
    Q2_K = (10, T.Q2_K)
    Q3_K_S = (11, T.Q3_K)
    Q3_K_M = (12, T.Q3_K)
    Q3_K_L = (13, T.Q3_K)
    Q4_K_S = (14, T.Q4_K)
    Q4_K_M = (15, T.Q4_K)
    Q5_K_S = (16, T.Q5_K)
    Q5_K_M = (17, T.Q5_K)
    Q6_K = (18, T.Q6_K)
    Q2_K_S = (21, T.Q2_K)
    IQ4_NL = (25, T.IQ4_NL)
    Q2_0 = (41, T.Q2_0)

    @property
    def id(self) -> int:
        return self.value[0]

    @property
    def default_type(self) -> T:
        return self.value[1]


def as_file_type(ftype: FileType | str) -> FileType:
    """A file type by member or name (``"Q4_K_M"``, case-insensitive)."""
    if isinstance(ftype, FileType):
        return ftype
    try:
        return FileType[str(ftype).upper()]
    except KeyError:
        raise ValueError(
            f"unknown or unsupported file type {ftype!r}; supported: {[f.name for f in FileType]}"
        ) from None


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters the mix reads: layers, attention heads (``n_gqa = n_head / n_head_kv``),
    experts, and the architecture (``"falcon"`` has rules of its own; an 80-layer ``"llama"``
    with grouped-query attention is llama.cpp's ``LLM_TYPE_70B``)."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    arch: str = "llama"

    @property
    def n_gqa(self) -> int:
        return 0 if self.n_head_kv == 0 else self.n_head // self.n_head_kv

    @property
    def is_70b(self) -> bool:
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv


# tensor_get_category
def category(name: str) -> str:
    """llama.cpp's tensor category: ``output``, ``token_embd``, ``attn_qkv``, ``attn_kv_b``,
    ``attn_v``, ``attn_k``, ``attn_q``, ``attn_output``, ``ffn_up``, ``ffn_gate``, ``ffn_down``
    or ``other`` (the first whose pattern the name contains)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for pattern, cat in (
        ("attn_qkv.weight", "attn_qkv"),
        ("attn_kv_b.weight", "attn_kv_b"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if pattern in name:
            return cat
    return "other"


ATTN_V = ("attn_v", "attn_qkv", "attn_kv_b")

#: Name fragments of the 2D tensors llama.cpp never quantizes (tensor_allows_quantization).
KEPT = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)


def allows_quantization(name: str, ne: Sequence[int]) -> bool:
    """Whether llama-quantize quantizes a tensor: 2D or 3D, named ``*weight``, not a norm, a
    router, a positional embedding or one of the other small tensors it keeps."""
    if len(ne) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(fragment in name for fragment in KEPT)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers given more bits: the first and last eighth, and every third one between."""
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or _c_mod(i_layer - n_layers // 8, 3) == 2
    )


def _c_mod(a: int, b: int) -> int:
    """C's ``%`` (the sign of the dividend)."""
    return a - b * int(a / b)


def block_size(t: T) -> int:
    """Weights per block (1 for F32 and F16)."""
    return TYPES[t].block_size if t in TYPES else 1


# tensor_type_fallback
FALLBACK = {
    T.Q2_0: T.Q4_0,
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


def fallback(t: T, ncols: int) -> T:
    """The type a row of ``ncols`` weights gets instead of ``t`` when ``t``'s block does not
    divide it: the block-32 type of ``FALLBACK``, or F16 when 32 does not divide it either."""
    if ncols % block_size(t) == 0:
        return t
    t2 = FALLBACK.get(t, t)  # a block-32 type stays itself, then becomes F16
    return t2 if ncols % block_size(t2) == 0 else T.F16


_LAYER = re.compile(r"^blk\.(\d+)\.")


def layer_of(name: str) -> int:
    """The layer number of a ``blk.N.`` tensor, -1 for the others."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names: Sequence[str]) -> list[str]:
    """Names in the order llama.cpp's loader keeps them: by layer (non-layer tensors first), then
    by name."""
    return sorted(names, key=lambda n: (layer_of(n), n))


class _State:
    """The counters of quantize_state_impl."""

    def __init__(self, names: Sequence[str], model: ModelShape, imatrix: bool):
        self.n_attention_wv = sum(category(n) in ATTN_V for n in names)
        self.n_ffn = model.n_layer
        self.i_attention_wv = 0
        self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.tied = "output.weight" not in names
        self.imatrix = imatrix


def _layer_info(i_layer: int, name: str, model: ModelShape) -> tuple[int, int]:
    if max(1, model.n_expert) > 1:
        i_layer = layer_of(name)
        if not 0 <= i_layer < model.n_layer:
            raise ValueError(f"bad layer {i_layer} for tensor {name}")
    return i_layer, model.n_layer


def _ffn_down_type(qs: _State, t: T, name: str, f: FileType, model: ModelShape) -> T:
    """llama_tensor_get_type_impl's rules for ffn_down (more bits in some layers)."""
    F = FileType
    falcon = model.arch == "falcon"
    i_layer, n_layer = _layer_info(qs.i_ffn_down, name, model)
    if f == F.Q2_K:
        t = T.Q3_K
    elif f == F.Q2_K_S:
        if i_layer < n_layer // 8:
            t = T.Q4_K
    elif f == F.Q3_K_M:
        if i_layer < n_layer // 16:
            t = T.Q5_K
        elif not falcon or use_more_bits(i_layer, n_layer):
            t = T.Q4_K
        else:
            t = T.Q3_K
    elif f == F.Q3_K_L:
        t = T.Q4_K if falcon else T.Q5_K
    elif f == F.Q4_K_M:
        if falcon:
            if i_layer < n_layer // 16:
                t = T.Q6_K
            else:
                t = T.Q5_K if use_more_bits(i_layer, n_layer) else T.Q4_K
        elif use_more_bits(i_layer, n_layer):
            t = T.Q6_K
    elif i_layer < n_layer // 8 and f == F.IQ4_NL and not qs.imatrix:
        t = T.Q5_K
    elif f == F.Q5_K_M and use_more_bits(i_layer, n_layer):
        t = T.Q6_K
    elif f == F.Q4_K_S and not falcon and i_layer < n_layer // 8:
        t = T.Q5_K
    elif f in (F.Q4_0, F.Q5_0) and qs.imatrix and i_layer < n_layer // 8:
        t = T.Q4_1 if f == F.Q4_0 else T.Q5_1
    return t


def _choose(qs: _State, t: T, name: str, ne: Sequence[int], f: FileType, model: ModelShape) -> T:
    """llama_tensor_get_type_impl for the file types of :class:`FileType`."""
    F = FileType
    cat = category(name)
    falcon = model.arch == "falcon"
    if cat == "output" or (qs.tied and cat == "token_embd"):
        if falcon or ne[0] % block_size(t) != 0:
            return T.Q8_0
        return T.Q6_K if t != T.Q8_0 else t
    if cat == "token_embd":
        return T.Q4_K if f == F.Q2_0 else t
    if cat in ATTN_V:  # attn_qkv too: llama.cpp's own attn_qkv rules come after and never run
        if f == F.Q2_K:
            t = T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        elif f == F.Q2_K_S and model.n_gqa >= 4:
            t = T.Q4_K
        elif f == F.Q3_K_M:
            t = T.Q5_K if qs.i_attention_wv < 2 else T.Q4_K
        elif f == F.Q3_K_L:
            t = T.Q5_K
        elif f == F.IQ4_NL and model.n_gqa >= 4:
            t = T.Q5_K
        elif f in (F.Q4_K_M, F.Q5_K_M) and use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            t = T.Q6_K
        elif f == F.Q4_K_S and qs.i_attention_wv < 4:
            t = T.Q5_K
        if model.is_70b and t in (T.Q3_K, T.Q4_K):
            t = T.Q5_K
        if model.n_expert == 8:
            t = T.Q8_0
        qs.i_attention_wv += 1
        return t
    if cat == "attn_k":
        return T.Q8_0 if model.n_expert == 8 else t
    if cat == "attn_q":
        return t
    if cat == "ffn_down":
        t = _ffn_down_type(qs, t, name, f, model)
        qs.i_ffn_down += 1
        return t
    if cat == "attn_output":
        if not falcon:
            if model.n_expert == 8:
                if f in (F.Q2_K, F.Q3_K_S, F.Q3_K_M, F.IQ4_NL, F.Q4_K_S, F.Q4_K_M):
                    t = T.Q5_K
            elif f == F.Q2_K:
                t = T.Q3_K
            elif f == F.Q3_K_M:
                t = T.Q4_K
            elif f == F.Q3_K_L:
                t = T.Q5_K
        elif f == F.Q3_K_L:
            t = T.Q4_K
        return t
    if cat in ("ffn_gate", "ffn_up"):
        counter = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        _layer_info(getattr(qs, counter), name, model)
        setattr(qs, counter, getattr(qs, counter) + 1)
    return t


def tensor_types(
    ftype: FileType | str,
    tensors: Mapping[str, Sequence[int]],
    model: ModelShape,
    imatrix: bool = False,
) -> dict[str, T | None]:
    """The type llama-quantize gives each tensor of a model for a file type.

    ``tensors`` maps GGUF names (``token_embd.weight``, ``blk.0.attn_q.weight``, ...) to their
    shapes in ggml order (``ne``: ``ne[0]`` is the row length, a linear layer's ``d_in``).
    Returns the names in llama.cpp's order, each with its :class:`GGMLType`, or None for a
    tensor left as it is (norms, biases, 1D tensors, ...).
    """
    return {name: final for name, (_, final) in _choices(ftype, tensors, model, imatrix).items()}


def fallbacks(
    ftype: FileType | str,
    tensors: Mapping[str, Sequence[int]],
    model: ModelShape,
    imatrix: bool = False,
) -> dict[str, tuple[T, T]]:
    """The tensors whose rows the mix's type does not fit: name -> (the type the mix chose, the
    type it falls back to), as :func:`tensor_types` applies them."""
    chosen = _choices(ftype, tensors, model, imatrix).items()
    return {n: (c, t) for n, (c, t) in chosen if c is not None and c != t}


def _choices(
    ftype: FileType | str,
    tensors: Mapping[str, Sequence[int]],
    model: ModelShape,
    imatrix: bool,
) -> dict[str, tuple[T | None, T | None]]:
    """name -> (the mix's type, the type after the fallback), in llama.cpp's order."""
    f = as_file_type(ftype)
    names = llama_order(list(tensors))
    qs = _State(names, model, imatrix)
    out: dict[str, tuple[T | None, T | None]] = {}
    for name in names:
        ne = tuple(int(n) for n in tensors[name])
        if not allows_quantization(name, ne):
            out[name] = (None, None)
            continue
        t = _choose(qs, f.default_type, name, ne, f, model)
        out[name] = (t, fallback(t, ne[0]))
    return out


def llama_tensor_shapes(
    n_layer: int,
    hidden: int,
    intermediate: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int,
    vocab: int,
    tied: bool = True,
) -> dict[str, tuple[int, ...]]:
    """The GGUF tensors (names and ``ne``) of a Llama-architecture model: embeddings, each
    block's attention, MLP and norms, the final norm and (untied) the output matrix."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (hidden, vocab)}
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (hidden,),
            b + "attn_q.weight": (hidden, n_head * head_dim),
            b + "attn_k.weight": (hidden, n_head_kv * head_dim),
            b + "attn_v.weight": (hidden, n_head_kv * head_dim),
            b + "attn_output.weight": (n_head * head_dim, hidden),
            b + "ffn_norm.weight": (hidden,),
            b + "ffn_gate.weight": (hidden, intermediate),
            b + "ffn_up.weight": (hidden, intermediate),
            b + "ffn_down.weight": (intermediate, hidden),
        }
    shapes["output_norm.weight"] = (hidden,)
    if not tied:
        shapes["output.weight"] = (hidden, vocab)
    return shapes
