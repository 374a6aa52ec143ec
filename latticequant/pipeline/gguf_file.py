"""A quantized model as one GGUF file that llama.cpp runs (the ``gguf`` format's container).

The file is written with the ``gguf`` package's :class:`gguf.GGUFWriter`: the architecture's
metadata from the model's config, the tokenizer's metadata copied from the source GGUF (the
file the model was read from), and the tensors under llama.cpp's names. Decoder linear layers
carry the blocks their method decoded (:class:`~latticequant.formats.gguf.format.GgufFormat`);
the embeddings (and an untied output matrix) are rounded by llama.cpp's own quantizer in the
type llama.cpp's mix gives them; norms and biases stay float32. Llama-family attention stores
its query and key rows permuted as ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` does.
The file appears only complete (:func:`~latticequant.pipeline.files.atomic_write`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latticequant.formats.gguf.blocks import pack as pack_blocks
from latticequant.formats.gguf.format import GGUF_ARCHITECTURES, gguf_tensor_name
from latticequant.formats.gguf.mix import FileType
from latticequant.formats.gguf.reference import quantize_reference
from latticequant.formats.gguf.types import GGMLType, type_info
from latticequant.pipeline.files import atomic_write
from latticequant.pipeline.state import OutputExistsError

__all__ = [
    "check_gguf_output",
    "write_gguf",
    "llama_permute",
    "COPIED_PREFIXES",
]

#: Metadata keys copied from the source GGUF: the tokenizer, and the model's description.
COPIED_PREFIXES = ("tokenizer.", "general.")
#: Keys never copied: the writer's own, and what this file decides itself.
NOT_COPIED = {
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
}


def check_gguf_output(out: str, overwrite: bool, source: str | None) -> None:
    """Refuse, before any slow work, an ``--out`` a GGUF cannot be written to, and a model
    whose tokenizer metadata has no source GGUF."""
    if not str(out).endswith(".gguf"):
        raise ValueError(f"--out {out}: a GGUF output is one file named *.gguf")
    if os.path.isdir(out):
        raise OutputExistsError(f"--out {out} is a folder; a GGUF output is one file")
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(f"output file {out} already exists; pass --overwrite to replace it")
    if source is None or not str(source).endswith(".gguf") or not os.path.isfile(source):
        raise ValueError(
            "a GGUF output copies the tokenizer metadata of a source .gguf model; quantize a "
            ".gguf file (Hugging Face folders are not converted yet)"
        )


def llama_permute(rows: int, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """The row order llama.cpp stores a query (or key) matrix of ``rows`` rows in:
    ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` applied to the row indices."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _arch_metadata(writer, arch: str, config, file_type: str) -> None:
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != int(config.hidden_size) // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(FileType[file_type].id)
    writer.add_quantization_version(2)


def _copy_metadata(writer, source: str) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if key in NOT_COPIED or not key.startswith(COPIED_PREFIXES) or not field.types:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _quantized(W: torch.Tensor, t: GGMLType | None) -> tuple[np.ndarray, GGMLType | None]:
    """A float matrix in type ``t`` by llama.cpp's own quantizer (float32 when None)."""
    x = W.detach().to(torch.float32).cpu().numpy()
    if t is None or t == GGMLType.F32:
        return np.ascontiguousarray(x), None
    if t == GGMLType.F16:
        return np.ascontiguousarray(x.astype(np.float16)), None
    codes, grid = quantize_reference(t, x)
    return pack_blocks(codes, grid), t


def _add(writer, name: str, data: np.ndarray, t: GGMLType | None, rows_of=None) -> None:
    import gguf

    if rows_of is not None:
        data = data[rows_of]
    data = np.ascontiguousarray(data)
    known = {int(q) for q in gguf.GGMLQuantizationType}
    if t is None:
        writer.add_tensor(name, data)
    elif int(t) in known:
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(int(t)))
    else:  # a type this gguf package does not list (Q2_0): its shape and id given as they are
        info = type_info(t)
        cols = data.shape[1] // info.type_size * info.block_size
        writer.add_tensor(
            name, data.view(np.int8), raw_shape=(data.shape[0], cols), raw_dtype=int(t)
        )


def write_gguf(
    model: nn.Module,
    layers: Mapping,
    fmt,
    out: str | os.PathLike,
    source: str,
    layer_format: str = "gguf",
) -> Path:
    """Write ``model`` (its decoder layers quantized: ``layers`` maps each layer's name to its
    :class:`~latticequant.pipeline.checkpoint.QuantizedLayer`) to the GGUF file ``out``."""
    import gguf

    config = model.config
    arch = GGUF_ARCHITECTURES[config.model_type]
    permute = arch == "llama"
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    types = fmt.types
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _copy_metadata(writer, source)
        _arch_metadata(writer, arch, config, fmt.file_type)
        emb = model.get_input_embeddings().weight
        _add(writer, "token_embd.weight", *_quantized(emb, types.get("token_embd.weight")))
        base = model.get_submodule("model")
        for i, block in enumerate(base.layers):
            prefix = f"model.layers.{i}"
            norms = {
                "attn_norm": block.input_layernorm.weight,
                "ffn_norm": block.post_attention_layernorm.weight,
            }
            attn = block.self_attn
            for local in ("q_norm", "k_norm"):  # Qwen3
                if getattr(attn, local, None) is not None:
                    norms[f"attn_{local}"] = getattr(attn, local).weight
            for key, w in norms.items():
                _add(writer, f"blk.{i}.{key}.weight", w.detach().float().cpu().numpy(), None)
            for local in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ):
                name = f"{prefix}.{local}"
                gname = gguf_tensor_name(name)
                module = block.get_submodule(local)
                layer = layers.get(name)
                if layer is not None and layer.format == layer_format:
                    if not layer.tensors:
                        raise ValueError(f"{name}: its GGUF blocks were not kept for the file")
                    data = layer.tensors["gguf_blocks"].cpu().numpy()
                    t = GGMLType(int(layer.tensors["gguf_type"]))
                else:  # a layer left in float
                    data, t = module.weight.detach().float().cpu().numpy(), None
                rows = None
                if permute and local in ("self_attn.q_proj", "self_attn.k_proj"):
                    heads = n_head if local == "self_attn.q_proj" else n_kv
                    rows = llama_permute(data.shape[0], n_head, heads)
                _add(writer, gname, data, t, rows)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    b = bias.detach().float().cpu().numpy()
                    if rows is not None:
                        b = b[rows]
                    _add(writer, gname.replace(".weight", ".bias"), b, None)
        _add(writer, "output_norm.weight", base.norm.weight.detach().float().cpu().numpy(), None)
        if not tied:
            head = model.get_output_embeddings().weight
            _add(writer, "output.weight", *_quantized(head, types.get("output.weight")))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
