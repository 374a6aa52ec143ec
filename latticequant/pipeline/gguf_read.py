"""Reading GGUF files through transformers' GGUF loader as llama.cpp reads them.

Two things the loader does not do by itself. Gemma 3: it maps only some of the file's keys to
the config and leaves the rest at ``Gemma3TextConfig``'s defaults, while llama.cpp reads them
(the sliding layers' rope base, the final logit soft-capping, the per-layer sliding pattern, the
linear rope scaling) or assumes them from the shape (the query scale, which no GGUF stores:
``query_pre_attn_scalar`` 256 by transformers' default, the head size by llama.cpp's, for every
Gemma 3 but the 27B); :func:`llama_cpp_config` sets them as llama.cpp does, so a file is scored
as the model llama.cpp runs. Q2_0:

transformers reads a GGUF file (its config, tokenizer and tensors) with ``gguf.GGUFReader`` and
dequantizes each tensor with ``gguf.dequantize``, both imported from the ``gguf`` package when
``load_gguf_checkpoint`` runs. gguf 0.19 does not know type 42: its reader refuses the file
while it lists the tensors. :func:`q2_0_reading` lends the package, for the duration of a
``with`` block, a reader that lists a type-42 tensor with its raw blocks (every other tensor is
listed by gguf's own code, so any other type gguf does not know is still refused as before) and
a ``dequantize`` that decodes type 42 with our dequantizer (``unpack`` of
:mod:`latticequant.formats.gguf.blocks`, ``dequantize`` of :mod:`latticequant.formats.gguf.types`:
the one definition of the Q2_0 layout) and defers every other type to gguf. Both names are put
back when the block exits. The patch is process-wide while it lasts: no other thread should
read GGUF files meanwhile. With a gguf that knows type 42 itself it changes nothing.
"""

from __future__ import annotations

import contextlib

import numpy as np

from latticequant.formats.gguf.blocks import unpack
from latticequant.formats.gguf.format import gemma3_attention_scale
from latticequant.formats.gguf.types import GGMLType, dequantize, type_info


def gguf_knows_q2_0() -> bool:
    import gguf

    return int(GGMLType.Q2_0) in {int(t) for t in gguf.GGMLQuantizationType}


def dequantize_q2_0(data: np.ndarray) -> np.ndarray:
    """float32 weights of Q2_0 tensor data ``(..., bytes_per_row)``: shape ``(..., cols)``."""
    data = np.asarray(data, dtype=np.uint8)
    info = type_info(GGMLType.Q2_0)
    cols = data.shape[-1] // info.type_size * info.block_size
    values = dequantize(*unpack(GGMLType.Q2_0, data.reshape(-1, data.shape[-1])))
    return values.reshape(*data.shape[:-1], cols)


def _reader_class(base):
    from gguf.gguf_reader import ReaderTensor

    q2 = int(GGMLType.Q2_0)
    info = type_info(GGMLType.Q2_0)

    class Q2_0Reader(base):
        """gguf's reader that also lists type-42 tensors (``tensor_type`` our ``GGMLType.Q2_0``,
        ``data`` the uint8 blocks ``(..., rows, bytes_per_row)``)."""

        def _build_tensors(self, start_offs, fields):
            ours = [f for f in fields if int(f.parts[4][0]) == q2]
            if not ours:
                return super()._build_tensors(start_offs, fields)
            super()._build_tensors(start_offs, [f for f in fields if int(f.parts[4][0]) != q2])
            by_field = {id(t.field): t for t in self.tensors}
            names = {t.name for t in self.tensors}
            for field in ours:
                _, name_data, _, dims, _, offset = field.parts
                name = str(bytes(name_data), encoding="utf-8")
                if name in names:
                    raise ValueError(f"Found duplicated tensor with name {name}")
                names.add(name)
                n_elems = int(np.prod(dims))
                np_dims = tuple(reversed(dims.tolist()))
                if np_dims[-1] % info.block_size:
                    raise ValueError(f"Q2_0 tensor {name} has rows of {np_dims[-1]} weights")
                n_bytes = n_elems // info.block_size * info.type_size
                offs = int(start_offs + offset[0])
                byte_dims = (*np_dims[:-1], np_dims[-1] // info.block_size * info.type_size)
                by_field[id(field)] = ReaderTensor(
                    name=name,
                    tensor_type=GGMLType.Q2_0,
                    shape=dims,
                    n_elements=n_elems,
                    n_bytes=n_bytes,
                    data_offset=offs,
                    data=self._get(offs, np.uint8, n_bytes).reshape(byte_dims),
                    field=field,
                )
            self.tensors = [by_field[id(f)] for f in fields]

    return Q2_0Reader


@contextlib.contextmanager
def q2_0_reading():
    """``gguf.GGUFReader`` and ``gguf.dequantize`` that also read Q2_0, inside the block only."""
    import gguf

    if gguf_knows_q2_0():
        yield
        return
    reader, deq = gguf.GGUFReader, gguf.dequantize

    def dequantize_with_q2_0(data, qtype):
        if isinstance(qtype, GGMLType) and qtype == GGMLType.Q2_0:
            return dequantize_q2_0(data)
        return deq(data, qtype)

    gguf.GGUFReader, gguf.dequantize = _reader_class(reader), dequantize_with_q2_0
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.dequantize = reader, deq


def llama_cpp_config(config, path: str):
    """``config`` (transformers' reading of the GGUF file at ``path``) with what llama.cpp reads
    from the file, or assumes, where transformers keeps its own defaults (Gemma 3 only)."""
    if getattr(config, "model_type", None) != "gemma3_text":
        return config
    import gguf

    with q2_0_reading():
        fields = gguf.GGUFReader(path).fields

    def value(key: str):
        field = fields.get(key.format(arch="gemma3"))
        return None if field is None else field.contents()

    config.query_pre_attn_scalar = int(gemma3_attention_scale(config))  # a whole number
    config.final_logit_softcapping = value(gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING)
    rope = {kind: dict(p) for kind, p in (config.rope_parameters or {}).items()}
    local = value(gguf.Keys.Rope.FREQ_BASE_SWA)
    if local is not None and "sliding_attention" in rope:
        rope["sliding_attention"]["rope_theta"] = float(local)
    if value(gguf.Keys.Rope.SCALING_TYPE) == "linear" and "full_attention" in rope:
        factor = float(value(gguf.Keys.Rope.SCALING_FACTOR))
        rope["full_attention"].update(rope_type="linear", factor=factor)
    config.rope_parameters = rope
    pattern = value(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN)
    if pattern is not None:
        sliding = [bool(v) for v in pattern]
        config.layer_types = [("sliding_attention" if v else "full_attention") for v in sliding]
    return config
