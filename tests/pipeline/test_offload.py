"""Blocks kept on disk: same results as the in-memory model, one block in memory at a time."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from runs import run_quantize
from tiny import id_stream, make_char_tokenizer, make_tiny_llama

from latticequant.checkpoint import CheckpointError, load_quantized
from latticequant.core.config import QuantConfig
from latticequant.pipeline.data import perplexity
from latticequant.pipeline.models import load_tokenizer
from latticequant.pipeline.offload import OffloadError, blockwise_logits, load_offloaded, store_of

N_BLOCKS = 3


def _cfg():
    return QuantConfig(bits=4, group_size=32, order="act")


def _save(folder, tie: bool = True, shard: str | None = "60KB"):
    model = make_tiny_llama(num_hidden_layers=N_BLOCKS, tie_word_embeddings=tie)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(folder, **kwargs)
    make_char_tokenizer().save_pretrained(folder)
    return model


def _read_all(folder):
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


class _Interrupt(Exception):
    pass


def _run_offloaded(folder, calib_ids, out, on_block_done=None):
    """Quantize the model in ``folder`` kept on disk; returns the model."""
    model = load_offloaded(folder)
    run_quantize(
        model, None, calib_ids, "gptq", _cfg(), out, progress=False, on_block_done=on_block_done
    )
    return model


def _interrupted_run(folder, calib_ids, out, after_block: int) -> None:
    def stop(index):
        if index == after_block:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _run_offloaded(folder, calib_ids, out, stop)
    assert not out.exists()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("shard", ["60KB", None])
def test_blocks_stay_on_meta_and_logits_match(tmp_path, tie, shard):
    full = _save(tmp_path / "m", tie, shard)
    model, tokenizer = load_offloaded(tmp_path / "m"), load_tokenizer(tmp_path / "m")
    assert tokenizer is not None
    store = store_of(model)
    assert len(store) == N_BLOCKS
    for name, p in model.named_parameters():
        assert (p.device.type == "meta") == name.startswith("model.layers."), name
    ids = id_stream(5 * 40).view(5, 40)
    got = torch.cat([logits for _, logits in blockwise_logits(model, ids, batch_size=2)])
    with torch.no_grad():
        want = full(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, want)
    assert not store.loaded
    assert perplexity(model, ids.flatten(), 40, progress=False) == pytest.approx(
        perplexity(full, ids.flatten(), 40, progress=False), rel=1e-12
    )


@pytest.mark.parametrize("tie", [True, False])
def test_quantize_offloaded_equals_in_memory(tmp_path, calib_ids, tie):
    full = _save(tmp_path / "m", tie)
    run_quantize(full, None, calib_ids, "gptq", _cfg(), tmp_path / "mem", progress=False)

    model, tokenizer = load_offloaded(tmp_path / "m"), load_tokenizer(tmp_path / "m")
    store = store_of(model)
    seen: list[tuple] = []
    # the tensors read at load time: parked, nothing may keep them alive
    first = [
        weakref.ref(p)
        for n, p in model.named_parameters(remove_duplicate=False)
        if not n.startswith("model.layers.")
    ]

    def watch(block, args, kwargs):  # how many blocks hold real weights while one runs
        real = sum(
            any(p.device.type != "meta" for p in b.parameters()) for b in store.layout.blocks
        )
        outside = {
            p.device.type
            for n, p in model.named_parameters(remove_duplicate=False)
            if not n.startswith("model.layers.")
        }
        gc.collect()
        freed = all(r() is None for r in first)
        seen.append((len(store.loaded), real, outside, freed))

    handles = [b.register_forward_pre_hook(watch, with_kwargs=True) for b in store.layout.blocks]
    run_quantize(model, tokenizer, calib_ids, "gptq", _cfg(), tmp_path / "off", progress=False)
    for h in handles:
        h.remove()
    # First the capture of block 0's inputs (nothing read), then each block alone in memory
    # while the embeddings, final norm and head wait on disk; they are back for the save.
    assert seen == [(0, 0, {"cpu"}, False)] + [(1, 1, {"meta"}, True)] * N_BLOCKS
    assert not store.loaded
    assert {
        p.device.type
        for n, p in model.named_parameters(remove_duplicate=False)
        if not n.startswith("model.layers.")
    } == {"cpu"}
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie

    index = json.loads((tmp_path / "off" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 1 + N_BLOCKS
    a, b = _read_all(tmp_path / "mem"), _read_all(tmp_path / "off")
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The model's own blocks now read the quantized weights back from the store.
    ids = id_stream(6 * 32, seed=3).view(6, 32)
    got = torch.cat([lg for _, lg in blockwise_logits(model, ids, 4)])
    with torch.no_grad():
        assert torch.equal(got, full(input_ids=ids, use_cache=False).logits)
        loaded = load_quantized(tmp_path / "off")
        assert torch.allclose(
            loaded(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_offloaded_resume(tmp_path, calib_ids):
    _save(tmp_path / "m")
    _run_offloaded(tmp_path / "m", calib_ids, tmp_path / "full")
    _interrupted_run(tmp_path / "m", calib_ids, tmp_path / "run", after_block=1)
    done: list[int] = []
    model = _run_offloaded(tmp_path / "m", calib_ids, tmp_path / "run", done.append)
    assert done == [2]
    a, b = _read_all(tmp_path / "full"), _read_all(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = id_stream(64, seed=5).view(2, 32)
    again = _run_offloaded(tmp_path / "m", calib_ids, None)
    assert torch.equal(
        torch.cat([lg for _, lg in blockwise_logits(model, ids, 2)]),
        torch.cat([lg for _, lg in blockwise_logits(again, ids, 2)]),
    )


def test_changed_weights_of_a_finished_block_refuse_resume(tmp_path, calib_ids):
    from latticequant.pipeline import ResumeMismatchError

    full = _save(tmp_path / "m")
    _interrupted_run(tmp_path / "m", calib_ids, tmp_path / "run", after_block=0)
    with torch.no_grad():  # same names, shapes and file sizes: only the values differ
        full.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    full.save_pretrained(tmp_path / "m", max_shard_size="60KB")
    model = load_offloaded(tmp_path / "m")
    with pytest.raises(ResumeMismatchError, match="block 0"):
        run_quantize(model, None, calib_ids, "gptq", _cfg(), tmp_path / "run", progress=False)
    assert not store_of(model).loaded


def test_folder_without_safetensors(tmp_path):
    folder = tmp_path / "bin"
    model = make_tiny_llama()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OffloadError, match="safetensors.*pytorch_model.bin"):
        load_offloaded(folder)


def test_missing_and_mismatched_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from latticequant.pipeline.models import load_model

    _save(tmp_path / "m", shard=None)
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(path))
    with pytest.raises(OffloadError, match="model.layers.1.mlp.down_proj.weight"):
        load_offloaded(tmp_path / "m")

    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    model = load_offloaded(tmp_path / "m")
    with pytest.raises(OffloadError, match="down_proj.weight has shape"):
        store_of(model).load(1)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(OffloadError, match="has none"):
        load_offloaded(tmp_path / "empty")
    with pytest.raises(OffloadError, match="GGUF"):
        load_model(None, offload=True)


def test_sharded_checkpoint_with_missing_shard(tmp_path, calib_ids):
    _save(tmp_path / "m")
    model = load_offloaded(tmp_path / "m")
    run_quantize(model, None, calib_ids, "gptq", _cfg(), tmp_path / "q", progress=False)
    (tmp_path / "q" / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00003-of-00004.safetensors"):
        load_quantized(tmp_path / "q")
    (tmp_path / "q" / "model.safetensors.index.json").write_text('{"weight_map": [')
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        load_quantized(tmp_path / "q")


def test_cli_offload_matches_in_memory(tmp_path, capsys):
    from latticequant.cli import main

    _save(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(32 + (7 * i) % 90) for i in range(6000)))
    results = {}
    for mode, extra in (
        ("mem", []),
        ("off", ["--offload", "--offload-dir", str(tmp_path / "store")]),
    ):
        args = ["quantize", str(tmp_path / "m"), "--out", str(tmp_path / mode), "--json"]
        args += ["--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "64"]
        args += ["--text", str(text), "--eval-text", str(text), "--eval-seqlen", "64"]
        assert main(args + extra) == 0
        results[mode] = json.loads(capsys.readouterr().out)
    assert results["off"]["ppl_before"] == pytest.approx(results["mem"]["ppl_before"], rel=1e-9)
    assert results["off"]["ppl_after"] == pytest.approx(results["mem"]["ppl_after"], rel=1e-9)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        f"block_{i:04d}.safetensors" for i in range(N_BLOCKS)
    ]
    assert (
        main(
            [
                "eval",
                str(tmp_path / "m"),
                "--offload",
                "--text",
                str(text),
                "--seqlen",
                "64",
                "--json",
            ]
        )
        == 0
    )
    ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert ppl == pytest.approx(results["mem"]["ppl_before"], rel=1e-9)
    assert main(["eval", "--offload"]) == 1
    assert "GGUF" in capsys.readouterr().err


def _moe_checkpoint(folder, model, calib_ids, out):
    run_quantize(model, None, calib_ids, "gptq", QuantConfig(bits=4, group_size=16), out,
                 progress=False)  # fmt: skip
    return _read_all(out)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_mixture_of_experts_offloaded_equals_in_memory(tmp_path, calib_ids, family):
    """The experts are split on meta and each expert's matrices read from the per-expert
    tensors the files hold (Mixtral's w1/w3/w2 under block_sparse_moe included)."""
    from tiny import make_tiny_moe

    from latticequant.pipeline.experts import RoutedExperts

    make_tiny_moe(family).save_pretrained(tmp_path / "m")
    mem = _moe_checkpoint(tmp_path / "m", make_tiny_moe(family), calib_ids, tmp_path / "mem")
    model = load_offloaded(tmp_path / "m")
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert experts and all(p.device.type == "meta" for m in experts for p in m.parameters())
    off = _moe_checkpoint(tmp_path / "m", model, calib_ids, tmp_path / "off")
    assert mem.keys() == off.keys()
    assert all(torch.equal(mem[k], off[k]) for k in mem)


def test_fused_expert_tensors_on_disk_are_read_as_slices(tmp_path, calib_ids):
    """Files holding the fused (E, 2I, H) and (E, H, I) tensors: each expert's gate, up and
    down rows are slices of them."""
    from safetensors.torch import load_file, save_file
    from tiny import make_tiny_moe

    family = "qwen3_moe"
    make_tiny_moe(family).save_pretrained(tmp_path / "m")  # config.json
    (tmp_path / "m" / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in make_tiny_moe(family).state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(
        tmp_path / "m" / "model.safetensors"
    )
    mem = _moe_checkpoint(tmp_path / "m", make_tiny_moe(family), calib_ids, tmp_path / "mem")
    model = load_offloaded(tmp_path / "m")
    source = store_of(model).sources["model.layers.0.mlp.experts.1.up_proj.weight"]
    assert source[1] == "model.layers.0.mlp.experts.gate_up_proj" and source[2][0] == 1
    off = _moe_checkpoint(tmp_path / "m", model, calib_ids, tmp_path / "off")
    assert mem.keys() == off.keys()
    assert all(torch.equal(mem[k], off[k]) for k in mem)
