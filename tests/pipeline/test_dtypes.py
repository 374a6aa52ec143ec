"""Models that live and run in bfloat16 or float16: loaded in their own dtype, quantized
without leaving it, and written as the same kind of checkpoint."""

from __future__ import annotations

import pytest
import torch
from runs import run_quantize
from safetensors.torch import load_file
from tiny import make_char_tokenizer, make_tiny_llama

import latticequant as lq
from latticequant.checkpoint import load_quantized
from latticequant.pipeline.data import perplexity, protocol_text, tokenize
from latticequant.pipeline.layout import describe_model
from latticequant.pipeline.models import ModelLoadError, load_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtypes")
    tok = make_char_tokenizer()
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        make_tiny_llama().to(dtype).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_auto_is_the_folder_dtype_and_an_explicit_one_wins(folders):
    assert load_model(str(folders["bfloat16"]), dtype="auto")[0].dtype == torch.bfloat16
    assert load_model(str(folders["float32"]), dtype="auto")[0].dtype == torch.float32
    assert load_model(str(folders["bfloat16"]), dtype="float16")[0].dtype == torch.float16
    with pytest.raises(ModelLoadError, match="--dtype must be one of"):
        load_model(str(folders["float32"]), dtype="int8")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_quantizing_in_a_half_dtype(folders, tmp_path, dtype):
    """The blocks stay in the model's dtype while they are quantized; the checkpoint has fp16
    scales and gives a perplexity close to the float32 run's."""
    tok = make_char_tokenizer()
    ids = tokenize(tok, protocol_text()[:6000])
    calib, held = ids[: 8 * 64].view(8, 64), ids[3000:]
    cfg = lq.QuantConfig(bits=4, group_size=32, order="act")
    ppl = {}
    for name in ("float32", dtype):
        model, _ = load_model(str(folders["bfloat16"]), dtype=name)
        layout = describe_model(model)
        seen = []

        def check(i, layout=layout, seen=seen):
            seen.append({p.dtype for p in layout.blocks[i].parameters()})

        out = tmp_path / name
        run_quantize(model, tok, calib, "gptq", cfg, out, progress=False, on_block_done=check)
        assert seen == [{getattr(torch, name)}] * len(layout.blocks)
        scales = [
            t for k, t in load_file(out / "model.safetensors").items() if k.endswith("scales")
        ]
        assert scales and all(t.dtype == torch.float16 for t in scales)
        ppl[name] = perplexity(load_quantized(out), held, 64, progress=False)
    assert ppl[dtype] == pytest.approx(ppl["float32"], rel=0.02)


def test_float64_hessians(folders):
    """The Hessian dtype is an option; in float64 the codes stay those of float32 but for a
    few rounding ties."""
    tok = make_char_tokenizer()
    calib = tokenize(tok, protocol_text()[:3000])[: 6 * 64].view(6, 64)
    cfg = lq.QuantConfig(bits=4, group_size=32, order="act")
    out = []
    for hd in (torch.float32, torch.float64):
        model, _ = load_model(str(folders["float32"]))
        stats = run_quantize(model, tok, calib, "gptq", cfg, hessian_dtype=hd, progress=False)
        out.append(sum(s["loss"] for s in stats))
    assert out[1] == pytest.approx(out[0], rel=1e-3)


class _Stop(Exception):
    pass


def test_a_bfloat16_run_resumes_to_the_same_checkpoint(folders, tmp_path):
    """The resume state keeps each finished layer's weight as written into the bfloat16 model
    (not a float32 Q beside it); a run stopped after its first block and resumed ends with the
    checkpoint and the logits of an uninterrupted run."""
    tok = make_char_tokenizer()
    calib = tokenize(tok, protocol_text()[:6000])[: 8 * 64].view(8, 64)
    cfg = lq.QuantConfig(bits=4, group_size=32, order="act")
    full, _ = load_model(str(folders["bfloat16"]), dtype="bfloat16")
    run_quantize(full, tok, calib, "gptq", cfg, tmp_path / "full", progress=False)

    def stop(index):
        raise _Stop

    out = tmp_path / "run"
    with pytest.raises(_Stop):
        model, _ = load_model(str(folders["bfloat16"]), dtype="bfloat16")
        run_quantize(model, tok, calib, "gptq", cfg, out, progress=False, on_block_done=stop)
    state = load_file(tmp_path / "run.partial" / "state" / "block_0000.safetensors")
    kept = [t for k, t in state.items() if k.endswith(".__Q__")]
    assert len(kept) == 7 and all(t.dtype == torch.bfloat16 for t in kept)
    resumed, _ = load_model(str(folders["bfloat16"]), dtype="bfloat16")
    run_quantize(resumed, tok, calib, "gptq", cfg, out, progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "full" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(resumed(calib[:2]).logits, full(calib[:2]).logits)
