"""A quantized model as one GGUF file that llama.cpp runs (the ``gguf`` format's container).

The file is written with the ``gguf`` package's :class:`gguf.GGUFWriter`: the architecture's
metadata from the model's config, the tokenizer's metadata copied from the source GGUF (the
file the model was read from) or built from the source Hugging Face folder as llama.cpp's
converter builds it (:mod:`~latticequant.pipeline.gguf_vocab`), and the tensors under
llama.cpp's names. Decoder linear layers carry the blocks their method decoded
(:class:`~latticequant.formats.gguf.format.GgufFormat`); the embeddings (and an untied output
matrix) are rounded by llama.cpp's own quantizer in the type llama.cpp's mix gives them; norms
and biases stay float32. Llama-family attention stores its query and key rows permuted as
``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` does. Gemma 3 stores each RMS norm's
``1 + w`` (transformers keeps the offset ``w``; llama.cpp multiplies by the stored weight) and
its rope bases, sliding window and logit soft-capping as the converter's ``Gemma3Model`` does;
llama.cpp scales its embeddings by ``sqrt(hidden)`` itself. The file appears only complete
(:func:`~latticequant.pipeline.files.atomic_write`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latticequant.formats.gguf.blocks import pack as pack_blocks
from latticequant.formats.gguf.format import (
    GGUF_ARCHITECTURES,
    gguf_tensor_name,
    rope_scaling,
    rope_thetas,
    text_config,
)
from latticequant.formats.gguf.mix import FileType
from latticequant.formats.gguf.reference import quantize_reference
from latticequant.formats.gguf.types import GGMLType, type_info
from latticequant.pipeline.files import atomic_write
from latticequant.pipeline.gguf_vocab import add_tokenizer_metadata, check_tokenizer_folder
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
    whose tokenizer the file cannot carry: ``source`` is the ``.gguf`` file the model was read
    from, or its Hugging Face folder, whose tokenizer must be one llama.cpp's converter
    writes (:func:`~latticequant.pipeline.gguf_vocab.check_tokenizer_folder`)."""
    if not str(out).endswith(".gguf"):
        raise ValueError(f"--out {out}: a GGUF output is one file named *.gguf")
    if os.path.isdir(out):
        raise OutputExistsError(f"--out {out} is a folder; a GGUF output is one file")
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(f"output file {out} already exists; pass --overwrite to replace it")
    if source is not None and os.path.isdir(source):
        check_tokenizer_folder(source)
    elif source is None or not str(source).endswith(".gguf") or not os.path.isfile(source):
        raise ValueError(
            "a GGUF output needs the model's tokenizer: quantize a .gguf file or a local "
            f"Hugging Face folder (got {source})"
        )


def llama_permute(rows: int, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """The row order llama.cpp stores a query (or key) matrix of ``rows`` rows in:
    ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` applied to the row indices."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _arch_metadata(writer, arch: str, config, file_type: str) -> None:
    config = text_config(config)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    theta, local_theta = rope_thetas(config)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(theta)
    if arch == "gemma3":
        _gemma3_metadata(writer, config, local_theta)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    else:
        writer.add_rope_dimension_count(head_dim)
        if head_dim != int(config.hidden_size) // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(FileType[file_type].id)
    writer.add_quantization_version(2)


def _gemma3_metadata(writer, config, local_theta: float | None) -> None:
    """What ``convert_hf_to_gguf.py``'s ``Gemma3Model`` adds (settings llama.cpp cannot read
    are refused by :func:`~latticequant.formats.gguf.format.check_gguf_config`)."""
    import gguf

    if local_theta is not None:
        writer.add_rope_freq_base_swa(local_theta)
    full, _ = rope_scaling(config)
    if full:  # linear: llama.cpp divides the full-attention layers' positions by the factor
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        writer.add_final_logit_softcapping(float(softcap))
    sliding = [t == "sliding_attention" for t in config.layer_types]
    if any(sliding):
        writer.add_sliding_window(int(config.sliding_window))
        # llama.cpp's default: every sixth layer full; any other pattern is written per layer
        if sliding != [(i + 1) % 6 != 0 for i in range(len(sliding))]:
            writer.add_sliding_window_pattern(sliding)


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


#: The norms of a decoder block, by their Hugging Face names inside the block (those a model
#: has), named in the file by the ``gguf`` package's tensor map for the architecture.
BLOCK_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "self_attn.q_norm",
    "self_attn.k_norm",
)
#: The linear layers of a decoder block, in the order llama.cpp's converter writes them.
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _text_model(model: nn.Module) -> nn.Module:
    """The module holding the decoder blocks, the embeddings and the final norm (a Gemma 3
    with images keeps its text model in ``model.language_model``)."""
    base = model.get_submodule("model")
    return getattr(base, "language_model", None) or base


def _norm(module: nn.Module, shift: float) -> np.ndarray:
    return module.weight.detach().float().cpu().numpy() + np.float32(shift)


def write_gguf(
    model: nn.Module,
    layers: Mapping,
    fmt,
    out: str | os.PathLike,
    source: str,
    layer_format: str = "gguf",
) -> Path:
    """Write ``model`` (its decoder layers quantized: ``layers`` maps each layer's name to its
    :class:`~latticequant.pipeline.checkpoint.QuantizedLayer`) to the GGUF file ``out``;
    ``source`` is the ``.gguf`` file the model was read from or its Hugging Face folder."""
    import gguf

    config = model.config
    text = text_config(config)
    arch = GGUF_ARCHITECTURES[config.model_type]
    permute = arch == "llama"
    shift = 1.0 if arch == "gemma3" else 0.0  # Gemma's RMS norms scale by 1 + w
    n_head = int(text.num_attention_heads)
    n_kv = int(getattr(text, "num_key_value_heads", None) or n_head)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is emb
    base = _text_model(model)
    names = {module: name for name, module in model.named_modules()}
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tensor_map = gguf.get_tensor_name_map(arch_id, len(base.layers))
    types = fmt.types
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        if os.path.isdir(source):
            writer.add_name(Path(source).resolve().name)
            add_tokenizer_metadata(writer, source, int(text.vocab_size), arch)
        else:
            _copy_metadata(writer, source)
        _arch_metadata(writer, arch, config, fmt.file_type)
        _add(writer, "token_embd.weight", *_quantized(emb, types.get("token_embd.weight")))
        for i, block in enumerate(base.layers):
            _add_block(
                writer,
                block,
                names[block],
                i,
                tensor_map,
                layers,
                layer_format,
                (n_head, n_kv) if permute else None,
                shift,
                arch,
            )
        _add(writer, "output_norm.weight", _norm(base.norm, shift), None)
        if not tied:
            _add(writer, "output.weight", *_quantized(head.weight, types.get("output.weight")))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _add_block(
    writer,
    block,
    prefix: str,
    i: int,
    tensor_map,
    layers: Mapping,
    layer_format: str,
    heads: tuple[int, int] | None,
    shift: float,
    arch: str,
) -> None:
    """One decoder block's norms and linear layers (with their biases) into ``writer``;
    ``heads``: ``(n_head, n_kv)`` when q/k rows are permuted as llama.cpp's converter does."""
    for local in BLOCK_NORMS:
        try:
            norm = block.get_submodule(local)
        except AttributeError:
            continue
        gname = tensor_map.get_name(f"model.layers.{i}.{local}")
        if gname is None:
            raise ValueError(f"{prefix}.{local}: no GGUF name for it in {arch}")
        _add(writer, f"{gname}.weight", _norm(norm, shift), None)
    for local in BLOCK_LINEARS:
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
        if heads is not None and local in ("self_attn.q_proj", "self_attn.k_proj"):
            n_head, n_kv = heads
            rows = llama_permute(
                data.shape[0], n_head, n_head if local == "self_attn.q_proj" else n_kv
            )
        _add(writer, gname, data, t, rows)
        bias = getattr(module, "bias", None)
        if bias is not None:
            b = bias.detach().float().cpu().numpy()
            if rows is not None:
                b = b[rows]
            _add(writer, gname.replace(".weight", ".bias"), b, None)
