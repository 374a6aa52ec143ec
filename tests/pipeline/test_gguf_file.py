"""A quantize run written to one GGUF file: tensors as llama.cpp names and lays them out, read
back by gguf's reader and by transformers' GGUF loader to the model the run quantized."""

from __future__ import annotations

import os
import string

import gguf
import numpy as np
import pytest
import torch

from latticequant.formats.gguf.format import gguf_tensor_name
from latticequant.formats.protocol import UnsupportedConfigError
from latticequant.pipeline.gguf_file import llama_permute
from latticequant.pipeline.run import Calibration, quantize_model
from latticequant.pipeline.spec import CalibrationSpec, OutputSpec, RunSpec, prepare
from latticequant.pipeline.state import OutputExistsError
from tests.tiny import make_tiny_llama

SHAPE = dict(hidden_size=256, intermediate_size=512, vocab_size=256)


def write_source_gguf(model, path) -> str:
    """A float32 GGUF of ``model`` with a small BPE tokenizer: what a quantized file copies its
    tokenizer metadata from."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    toks = ["<unk>", "<s>", "</s>", *string.ascii_letters, *string.digits, *" .,!?'\n"]
    toks += [f"<{i}>" for i in range(cfg.vocab_size - len(toks))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * len(toks))
    w.add_token_types([1] * len(toks))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for local in ("q_proj", "k_proj", "v_proj", "o_proj"):
            W = sd[p + "self_attn." + local + ".weight"]
            if local in ("q_proj", "k_proj"):
                heads = cfg.num_attention_heads if local == "q_proj" else cfg.num_key_value_heads
                W = W[llama_permute(W.shape[0], cfg.num_attention_heads, heads)]
            w.add_tensor(gguf_tensor_name(p + "self_attn." + local), np.ascontiguousarray(W))
        for local in ("gate_proj", "up_proj", "down_proj"):
            w.add_tensor(gguf_tensor_name(p + "mlp." + local), sd[p + "mlp." + local + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def transformers_gguf_model(path: str):
    """The model transformers' GGUF loader reads (its config, then its dequantized tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model.eval()


def _run(model, source, out, gguf_type, method="gptq", overwrite=False):
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = RunSpec(
        method=method,
        calibration=CalibrationSpec(nsamples=4, seqlen=32),
        output=OutputSpec(
            str(out), "gguf", overwrite, gguf_type=gguf_type, gguf_source=str(source)
        ),
    )
    plan = prepare(model, spec)
    return quantize_model(model, Calibration(calib), plan), plan


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_source_gguf(make_tiny_llama(**SHAPE), tmp_path_factory.mktemp("src") / "f.gguf")


@pytest.mark.parametrize("gguf_type", ["Q4_K_M", "Q8_0", "Q3_K_S", "IQ4_NL"])
def test_file_reads_back_to_the_quantized_model(tmp_path, source, gguf_type):
    model = make_tiny_llama(**SHAPE)
    out = tmp_path / "q.gguf"
    _, plan = _run(model, source, out, gguf_type)
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert str(reader.fields["tokenizer.ggml.model"].contents()) == "llama"
    # every quantized layer's file tensor dequantizes, by gguf's own code, to the weight the
    # run put into the model (query and key rows in llama.cpp's order)
    cfg = model.config
    for name, module in model.named_modules():
        gname = gguf_tensor_name(name)
        if gname is None:
            continue
        t = tensors[gname]
        assert t.tensor_type == plan.format.types[gname]
        W = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        want = module.weight.detach().numpy()
        if name.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
            want = want[llama_permute(want.shape[0], cfg.num_attention_heads, heads)]
        assert np.array_equal(W, want), name
    # transformers' GGUF loader reads the file to the same model
    loaded = transformers_gguf_model(str(out))
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = loaded(ids).logits
    # the embeddings are rounded by llama.cpp's quantizer in the file, not in the model
    emb = gguf.quants.dequantize(
        np.asarray(tensors["token_embd.weight"].data), tensors["token_embd.weight"].tensor_type
    )
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.from_numpy(emb))
        ours = model(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_existing_file_refused_and_nothing_half_written(tmp_path, source):
    model = make_tiny_llama(**SHAPE)
    out = tmp_path / "q.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _run(model, source, out, "Q4_0")
    assert out.read_bytes() == b"keep"
    _run(model, source, out, "Q4_0", overwrite=True)
    assert gguf.GGUFReader(str(out)).tensors
    assert sorted(os.listdir(tmp_path)) == ["q.gguf"]


def test_unsupported_architecture_and_missing_source(tmp_path, source):
    from tests.tiny import make_tiny_opt

    with pytest.raises(UnsupportedConfigError, match="architecture 'opt'"):
        _run(make_tiny_opt(), source, tmp_path / "q.gguf", "Q8_0")
    model = make_tiny_llama(**SHAPE)
    with pytest.raises(ValueError, match="needs the model.s tokenizer"):
        _run(model, tmp_path / "none.gguf", tmp_path / "q.gguf", "Q8_0")
    assert not os.listdir(tmp_path)


def test_truncated_file_is_a_one_line_error(tmp_path, source):
    from latticequant.pipeline.models import ModelLoadError, load_model

    model = make_tiny_llama(**SHAPE)
    out = tmp_path / "q.gguf"
    _run(model, source, out, "Q4_K_S")
    data = out.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as err:
        load_model(str(bad))
    assert "\n" not in str(err.value).strip()


def test_q2_0_blocks_written_and_read_back(tmp_path, source):
    """gguf 0.19 does not list Q2_0 (ggml type 42): the file holds the blocks byte for byte
    under that type id, for llama.cpp builds that know it, and `latticequant eval` reads it."""
    from latticequant.formats.gguf.blocks import unpack
    from latticequant.formats.gguf.types import dequantize

    model = make_tiny_llama(**SHAPE)
    out = tmp_path / "q.gguf"
    _, plan = _run(model, source, out, "Q2_0", method="babai")
    data = np.frombuffer(out.read_bytes(), dtype=np.uint8)
    assert data[:4].tobytes() == b"GGUF"
    starts = np.arange(0, len(data) - 18, 32)  # tensor data is 32-byte aligned
    first = data[starts[:, None] + np.arange(18)]  # the first block at every aligned offset
    with np.errstate(all="ignore"):
        codes, grid = unpack(42, first)
        values = dequantize(codes, grid)
    for name, module in model.named_modules():
        gname = gguf_tensor_name(name)
        if gname is None or name.endswith(("q_proj", "k_proj")):
            continue
        assert int(plan.format.types[gname]) == 42
        W = module.weight.detach().numpy()
        n = W.shape[0] * (W.shape[1] // 64 * 18)
        found = False
        for start in starts[(values == W[0, :64]).all(axis=1)]:
            if len(data) - start < n:
                continue
            chunk = data[start : start + n].reshape(W.shape[0], -1)
            found = found or np.array_equal(dequantize(*unpack(42, chunk)), W)
        assert found, name
    # `latticequant eval`'s loader reads it back (our dequantizer for type 42, gguf's for the
    # rest) to the logits of a model built here from the file's bytes
    from latticequant.pipeline.models import load_model

    loaded, _ = load_model(str(out))
    ref = _model_from_raw_gguf(out, model.config)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = loaded(ids).logits
        assert torch.allclose(ref(ids).logits, theirs, atol=1e-5, rtol=1e-5)
        # and to the quantized model's, its embeddings rounded as in the file
        model.get_input_embeddings().weight.copy_(ref.get_input_embeddings().weight)
        assert torch.allclose(model(ids).logits, theirs, atol=1e-5, rtol=1e-5)
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader  # gguf's own names put back
    assert gguf.dequantize is gguf.quants.dequantize


def test_other_unknown_ggml_type_refused_in_one_line(tmp_path, source):
    """A tensor type gguf does not know other than Q2_0 is still refused in one line."""
    from latticequant.pipeline.models import ModelLoadError, load_model

    model = make_tiny_llama(**SHAPE)
    out = tmp_path / "q.gguf"
    _run(model, source, out, "Q8_0", method="babai")
    raw = bytearray(out.read_bytes())
    _, infos, _ = _raw_gguf(bytes(raw))
    unknown = max(int(t) for t in gguf.GGMLQuantizationType) + 7
    type_at = infos["blk.0.ffn_down.weight"][2]
    raw[type_at : type_at + 4] = np.uint32(unknown).tobytes()
    out.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(out))
    assert f"ggml type {unknown}" in str(err.value) and "llama.cpp" in str(err.value)
    assert "\n" not in str(err.value)


def _raw_gguf(raw: bytes):
    """The header of a GGUF file read byte by byte: its metadata, each tensor's ``(ggml type,
    dims, offset of its type id in the file, offset of its data in the file)``, and nothing
    else of gguf's or ours."""
    pos = 0

    def take(fmt):
        nonlocal pos
        value = np.frombuffer(raw, dtype=fmt, count=1, offset=pos)[0]
        pos += np.dtype(fmt).itemsize
        return value.item()

    def string():
        nonlocal pos
        n = take("<u8")
        pos += n
        return raw[pos - n : pos].decode()

    scalars = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1"}
    scalars |= {10: "<u8", 11: "<i8", 12: "<f8"}

    def value(vtype):
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, n = take("<u4"), take("<u8")
            return [value(itype) for _ in range(n)]
        return take(scalars[vtype])

    assert raw[:4] == b"GGUF" and take("<u4") == 0x46554747 and take("<u4") == 3
    n_tensors, n_kv = take("<u8"), take("<u8")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<u4"))
    infos = {}
    for _ in range(n_tensors):
        name = string()
        dims = [take("<u8") for _ in range(take("<u4"))]
        type_at = pos
        infos[name] = [take("<u4"), dims, type_at, take("<u8")]
    align = meta.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    for info in infos.values():
        info[3] += start
    return meta, infos, start


def _decode_q2_0(raw: bytes, at: int, rows: int, cols: int) -> np.ndarray:
    """Q2_0 blocks decoded one by one as ggml's ``dequantize_row_q2_0`` does: 18 bytes per 64
    weights, a float16 ``d`` then weight ``j`` in bits ``2 (j % 4)`` of byte ``2 + j / 4``,
    worth ``(z - 1) * d``."""
    out = np.empty((rows, cols), dtype=np.float32)
    j = np.arange(64)
    for r in range(rows):
        for b in range(cols // 64):
            block = np.frombuffer(raw, dtype=np.uint8, count=18, offset=at)
            at += 18
            d = np.float32(block[:2].view("<f2")[0])
            z = (block[2 + j // 4] >> (2 * (j % 4))) & 3
            out[r, 64 * b : 64 * b + 64] = (z.astype(np.float32) - 1) * d
    return out


def _model_from_raw_gguf(path, config):
    """A llama of ``config`` holding a tiny GGUF file's tensors decoded from its bytes: Q2_0
    blocks by :func:`_decode_q2_0`, float tensors as they are, other quantized types by gguf."""
    from transformers import LlamaForCausalLM

    raw = open(path, "rb").read()
    _, infos, _ = _raw_gguf(raw)
    weights = {}
    for name, (qtype, dims, _, at) in infos.items():
        shape = tuple(reversed(dims))
        n = int(np.prod(shape))
        if qtype == 42:
            weights[name] = _decode_q2_0(raw, at, int(np.prod(shape[:-1])), shape[-1])
        elif qtype == 0:
            weights[name] = np.frombuffer(raw, "<f4", count=n, offset=at).copy()
        else:
            t = gguf.GGMLQuantizationType(qtype)
            block, size = gguf.GGML_QUANT_SIZES[t]
            data = np.frombuffer(raw, np.uint8, count=n // block * size, offset=at)
            weights[name] = gguf.quants.dequantize(data.reshape(-1, size), t)
        weights[name] = weights[name].reshape(shape)
    ref = LlamaForCausalLM(config).float().eval()
    state = {"model.embed_tokens.weight": weights["token_embd.weight"]}
    state["model.norm.weight"] = weights["output_norm.weight"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = weights[f"blk.{i}.attn_norm.weight"]
        state[p + "post_attention_layernorm.weight"] = weights[f"blk.{i}.ffn_norm.weight"]
        for local in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            W = weights[gguf_tensor_name(p + local)]
            if local in ("self_attn.q_proj", "self_attn.k_proj"):  # back from llama.cpp's rows
                heads = config.num_attention_heads
                heads = heads if local.endswith("q_proj") else config.num_key_value_heads
                W = W[np.argsort(llama_permute(W.shape[0], config.num_attention_heads, heads))]
            state[p + local + ".weight"] = W
    assert "output.weight" not in infos  # tied embeddings
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    ref.tie_weights()
    return ref


def test_command_line_quantize_then_eval(tmp_path, source, capsys):
    from latticequant import cli

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "m.gguf"
    args = ["quantize", source, "--method", "babai", "--checkpoint-format", "gguf"]
    args += ["--gguf-type", "Q4_K_S", "--out", str(out), "--nsamples", "4", "--seqlen", "32"]
    assert cli.main([*args, "--text", str(text), "--no-eval"]) == 0
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == 14
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--seqlen", "32", "--text", str(text), "--json"]) == 0
    assert '"perplexity"' in capsys.readouterr().out


@pytest.mark.parametrize("untied", [False, True], ids=["norms-of-ones", "untied-head"])
def test_folded_rotation_goes_into_the_file(tmp_path, source, untied):
    """``--rotate folded`` leaves a plain llama: transformers' GGUF loader reads the file to
    the quantized model's logits, and a final norm that is not all ones unties the head, which
    the file then stores as ``output.weight``, typed as llama-quantize types an untied model
    (llama_tensor_get_type: the output Q6_K on rows of 256, the embeddings the file type's own
    Q4_0), where a tied model's embeddings take the output's Q6_K."""
    from latticequant.pipeline.target import TargetConfig

    model = make_tiny_llama(**SHAPE)
    if untied:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    out = tmp_path / "f.gguf"
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = RunSpec(
        method="gptq",
        target=TargetConfig(rotate="folded"),
        calibration=CalibrationSpec(nsamples=4, seqlen=32),
        output=OutputSpec(str(out), "gguf", gguf_type="Q4_0", gguf_source=str(source)),
    )
    quantize_model(model, Calibration(calib), prepare(model, spec))
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert ("output.weight" in tensors) == untied
    embeddings = {k: tensors[k].tensor_type.name for k in ("token_embd.weight", "output.weight")
                  if k in tensors}  # fmt: skip
    assert embeddings == (
        {"token_embd.weight": "Q4_0", "output.weight": "Q6_K"}
        if untied
        else {"token_embd.weight": "Q6_K"}
    )
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_0"
    loaded = transformers_gguf_model(str(out))
    for key, module in (
        ("token_embd.weight", model.get_input_embeddings()),
        ("output.weight", model.get_output_embeddings()),
    ):  # the embeddings are rounded by llama.cpp's quantizer in the file only
        if key in tensors:
            t = tensors[key]
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(w))
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5, rtol=1e-5)


def test_hugging_face_folder_gets_the_converters_tokenizer(
    tmp_path, smollm2_tokenizer_fields, smollm2_tokenizer_dir, capsys
):
    """A tiny random llama saved with SmolLM2's real tokenizer as a Hugging Face folder,
    quantized by the command line to a GGUF: the file's tokenizer metadata is the one llama.cpp's
    converter wrote into the default GGUF (the independent reference), and transformers' GGUF
    loader reads the file's tokenizer to the same ids as the folder's."""
    import shutil

    from transformers import AutoTokenizer

    from latticequant import cli
    from tests.pipeline.test_gguf_vocab import CONVERTER_KEYS, tokenizer_fields

    folder = tmp_path / "smol-tiny"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    make_tiny_llama(
        vocab_size=49152, hidden_size=64, intermediate_size=128, bos_token_id=1, eos_token_id=2
    ).save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. 12 + 30 = 42.\n" * 100)
    out = tmp_path / "m.gguf"
    args = ["quantize", str(folder), "--method", "rtn", "--checkpoint-format", "gguf"]
    args += ["--gguf-type", "Q8_0", "--out", str(out), "--nsamples", "4", "--seqlen", "32"]
    assert cli.main([*args, "--text", str(text), "--no-eval"]) == 0
    capsys.readouterr()
    ours, theirs = tokenizer_fields(out), smollm2_tokenizer_fields
    for key in CONVERTER_KEYS:
        assert ours[key] == theirs[key], key
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.name"].contents() == "smol-tiny"
    sample = "Hello, world! <|im_start|>user\nWhat is 2+2?<|im_end|>\n  Tabs\tand émojis 🦙."
    read = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    want = AutoTokenizer.from_pretrained(str(folder))(sample)["input_ids"]
    assert read(sample)["input_ids"] == want
    assert len(want) > 20


def test_hugging_face_folder_with_unknown_tokenizer_refused_before_the_run(tmp_path, capsys):
    from latticequant import cli
    from tests.pipeline.test_gguf_vocab import small_bpe_folder

    folder = tmp_path / "tiny"
    make_tiny_llama(vocab_size=262).save_pretrained(folder)
    small_bpe_folder(folder)
    out = tmp_path / "m.gguf"
    args = ["quantize", str(folder), "--checkpoint-format", "gguf", "--gguf-type", "Q8_0"]
    capsys.readouterr()
    assert cli.main([*args, "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert "pre-tokenizer not recognized" in err and len(err.splitlines()) == 1
    assert not out.exists()


GEMMA3 = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    max_position_embeddings=256,
    sliding_window=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def make_tiny_gemma3(**changes):
    """A tiny random Gemma 3 (text): six layers, the sixth full attention and the others a
    sliding window of 8; its norms' offsets drawn around 0 (transformers scales by ``1 + w``),
    its matrices scaled as the tiny llama's."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**{**GEMMA3, **changes}))
    model = model.float().eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model


def gemma3_settings(layer_types: list[str], local_theta: float) -> dict:
    """Gemma 3 settings beyond llama.cpp's defaults: soft-capping 30, linear rope scaling by 8
    on the full-attention layers, ``layer_types``, the sliding layers' rope base."""
    return dict(
        final_logit_softcapping=30.0,
        layer_types=layer_types,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
    )


def test_gemma3_file_reads_back_to_the_quantized_model(tmp_path, source):
    """Gemma 3 as llama.cpp's converter writes it: norms as ``1 + w`` under gguf's names for
    the architecture (``post_attention_norm``, ``ffn_norm``, ``post_ffw_norm``, ``attn_q_norm``,
    ``attn_k_norm``), query and key rows not permuted, both rope bases and the sliding window;
    transformers' GGUF loader (its Gemma 3 reader subtracts the 1) reads it to the quantized
    model's logits."""
    model = make_tiny_gemma3()
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    out = tmp_path / "g.gguf"
    _, plan = _run(model, source, out, "Q4_K_M", method="rtn")
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.rope.freq_base"] == 1e6 and fields["gemma3.rope.freq_base_swa"] == 1e4
    assert fields["gemma3.attention.sliding_window"] == 8
    assert fields["gemma3.attention.key_length"] == 256
    assert "gemma3.attention.sliding_window_pattern" not in fields  # llama.cpp's default of 6
    assert "gemma3.final_logit_softcapping" not in fields
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors
    local = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
    }
    for name, w in norms.items():
        if name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{local[rest.removesuffix('.weight')]}.weight"
        assert np.array_equal(np.asarray(tensors[gname].data), w.numpy() + np.float32(1)), name
    for name, module in model.named_modules():
        gname = gguf_tensor_name(name)
        if gname is None:
            continue
        t = tensors[gname]
        assert t.tensor_type == plan.format.types[gname]
        W = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert np.array_equal(W, module.weight.detach().numpy()), name  # rows as they are
    loaded = transformers_gguf_model(str(out))
    assert loaded.config.layer_types == model.config.layer_types
    t = tensors["token_embd.weight"]
    emb = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    with torch.no_grad():  # llama.cpp's quantizer rounds the embeddings in the file only
        model.get_input_embeddings().weight.copy_(torch.from_numpy(emb))
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5, rtol=1e-5)


def test_gemma3_settings_written_or_refused(tmp_path, source):
    """Logit soft-capping, linear rope scaling and a sliding pattern other than llama.cpp's
    default go into the file as the converter writes them; settings llama.cpp's gemma3 graph
    does not read are refused in one line, before anything is written."""
    types = ["sliding_attention", "full_attention"] * 3
    model = make_tiny_gemma3(**gemma3_settings(types, local_theta=1e4))
    out = tmp_path / "g.gguf"
    _run(model, source, out, "Q8_0", method="rtn")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
    assert fields["gemma3.final_logit_softcapping"] == 30.0
    assert fields["gemma3.rope.scaling.type"] == "linear"
    assert fields["gemma3.rope.scaling.factor"] == 8.0
    assert fields["gemma3.attention.sliding_window_pattern"] == [t == types[0] for t in types]
    for changes, match in (
        (dict(query_pre_attn_scalar=144), "query_pre_attn_scalar 144"),
        (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        (dict(hidden_activation="gelu"), "hidden_activation 'gelu'"),
    ):
        bad = tmp_path / "bad.gguf"
        with pytest.raises(UnsupportedConfigError, match=match) as err:
            _run(make_tiny_gemma3(**changes), source, bad, "Q8_0")
        assert "\n" not in str(err.value) and not bad.exists()


def test_gemma3_file_reads_back_with_what_llama_cpp_reads(tmp_path, source):
    """transformers' GGUF loader leaves Gemma 3 settings at its config's defaults; llama.cpp
    reads them from the file, or (the query scale) assumes the head size. Our reader follows
    llama.cpp: with a head of 64 (not transformers' default scale of 256), soft-capping, linear
    rope scaling and another sliding pattern, the file reads back to the source model itself
    (its config as given, the file's weights loaded into it)."""
    from latticequant.pipeline.models import load_model

    types = ["sliding_attention", "full_attention"] * 3
    settings = gemma3_settings(types, local_theta=2e4)
    model = make_tiny_gemma3(head_dim=64, query_pre_attn_scalar=64, **settings)
    out = tmp_path / "g.gguf"
    _run(model, source, out, "Q8_0", method="rtn")
    plain = transformers_gguf_model(str(out))
    assert plain.config.query_pre_attn_scalar == 256  # what transformers alone would run
    loaded, _ = load_model(str(out))
    assert loaded.config.query_pre_attn_scalar == 64
    assert loaded.config.final_logit_softcapping == 30.0
    assert loaded.config.layer_types == types
    assert loaded.config.rope_parameters["sliding_attention"]["rope_theta"] == 2e4
    assert loaded.config.rope_parameters["full_attention"]["factor"] == 8.0
    with torch.no_grad():
        model.load_state_dict(loaded.state_dict())
        ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-2)


def test_gemma3_with_images_writes_its_text_model(tmp_path, source):
    """A Gemma 3 with a vision tower (``model_type`` ``gemma3``, its text model in
    ``model.language_model``) gives the same file as its text model alone: the vision tower is
    a separate file for llama.cpp."""
    import transformers

    text = make_tiny_gemma3()
    vision = dict(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(text_config=text.config.to_dict(), vision_config=vision)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    model.model.language_model.load_state_dict(text.model.state_dict())
    files = {}
    for key, m in (("images", model), ("text", text)):
        files[key] = tmp_path / f"{key}.gguf"
        _run(m, source, files[key], "Q8_0", method="rtn")
    a, b = (gguf.GGUFReader(str(files[k])) for k in ("images", "text"))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name
    fields = [{k: f.contents() for k, f in r.fields.items() if "gemma3." in k} for r in (a, b)]
    assert fields[0] == fields[1]
