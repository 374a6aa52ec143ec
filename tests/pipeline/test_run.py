"""Block-by-block quantization of tiny models against a naive whole-model reference."""

from __future__ import annotations

import json

import pytest
import torch
from runs import run_quantize
from tiny import GROUP, make_tiny_llama, make_tiny_opt

import latticequant as lq
from latticequant.formats import dequantize_gptq, pack_gptq
from latticequant.methods import Method, get_method
from latticequant.pipeline import (
    OutputExistsError,
    Override,
    ResumeMismatchError,
    parse_override,
)
from latticequant.pipeline.layout import describe_model, linear_weight, set_linear_weight


def _cfg(**kw):
    return lq.QuantConfig(**{"bits": 4, "group_size": GROUP, "order": "act", **kw})


@torch.no_grad()
def naive_true_sequential(model, calib, core, cfg):
    """Reference: for every group of layers, run the WHOLE model from the token ids, collect the
    group's inputs, form H = X^T X / n in float64 and quantize with the core function."""
    layout = describe_model(model)
    for b in range(len(layout.blocks)):
        for subset in layout.subsets:
            names = [f"{layout.block_name(b)}.{s}" for s in subset]
            xs: dict = {n: [] for n in names}

            def grab(module, args, n, xs=xs):
                xs[n].append(args[0].reshape(-1, args[0].shape[-1]).double())

            handles = [
                model.get_submodule(n).register_forward_pre_hook(
                    lambda m, a, n=n, grab=grab: grab(m, a, n)
                )
                for n in names
            ]
            model(input_ids=calib, use_cache=False)
            for h in handles:
                h.remove()
            for n in names:
                X = torch.cat(xs[n])
                H = X.T @ X / X.shape[0]
                module = model.get_submodule(n)
                r = core(linear_weight(module).double(), H, cfg)
                set_linear_weight(
                    module, dequantize_gptq(pack_gptq(r), cfg.bits, dtype=torch.float64)
                )
    return model


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["rtn", "gptq", "babai"])
def test_pipeline_equals_naive_reference(name, calib_ids):
    model = make_tiny_llama().double()
    ref = naive_true_sequential(
        make_tiny_llama().double(), calib_ids, getattr(lq, f"{name}_quantize"), _cfg()
    )
    stats = run_quantize(
        model, None, calib_ids, name, _cfg(), None, progress=False, hessian_dtype=torch.float64
    )
    assert len(stats) == 14 and [s["name"] for s in stats] == describe_model(model).linear_names()
    assert all(s["n_tokens"] == calib_ids.numel() for s in stats)
    got, want = _weights(model), _weights(ref)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-10), key
    logits = model(calib_ids[:2]).logits
    assert torch.allclose(logits, ref(calib_ids[:2]).logits, atol=1e-9)


def test_batched_passes_equal_single_pass(calib_ids):
    outs = []
    for batch_size in (None, 3):
        model = make_tiny_llama().double()
        run_quantize(
            model,
            None,
            calib_ids,
            "gptq",
            _cfg(),
            None,
            batch_size=batch_size,
            progress=False,
            hessian_dtype=torch.float64,
        )
        outs.append(model(calib_ids[:2]).logits)
    assert torch.equal(outs[0], outs[1])


def test_babai_equals_gptq_in_same_decoding_order(calib_ids):
    outs = []
    for name in ("gptq", "babai"):
        model = make_tiny_llama().double()
        run_quantize(model, None, calib_ids, name, _cfg(), None, progress=False)
        outs.append(model(calib_ids[:2]).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-9)


def test_quantized_weights_lie_on_grid_and_rest_untouched(calib_ids):
    model = make_tiny_llama()
    before = _weights(model)
    stats = run_quantize(model, None, calib_ids, "gptq", _cfg(bits=3), None, progress=False)
    after = _weights(model)
    quantized = {s["name"] + ".weight" for s in stats}
    for key in before:
        if key in quantized:
            W = after[key].reshape(after[key].shape[0], -1, GROUP)
            levels = max(
                len(torch.unique(W[r, g])) for r in range(W.shape[0]) for g in range(W.shape[1])
            )
            assert levels <= 8
            assert not torch.equal(before[key], after[key])
        else:
            assert torch.equal(before[key], after[key]), key  # embeddings, norms, lm_head


def test_overrides_skip_and_change_bits(calib_ids):
    model = make_tiny_llama()
    down0 = model.model.layers[0].mlp.down_proj.weight.clone()
    overrides = [Override(r"layers\.0\.mlp\.down_proj", skip=True), parse_override("v_proj:bits=2")]
    stats = run_quantize(
        model, None, calib_ids, "rtn", _cfg(), None, overrides=overrides, progress=False
    )
    names = [s["name"] for s in stats]
    assert "model.layers.0.mlp.down_proj" not in names and len(names) == 13
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down0)
    v = model.model.layers[1].self_attn.v_proj.weight.reshape(-1, GROUP)
    assert max(len(torch.unique(row)) for row in v) <= 4
    v_stats = stats[names.index("model.layers.1.self_attn.v_proj")]
    assert v_stats["bits_per_weight"] == 2 + (16 + 2) / GROUP + 32 / 32  # codes, scale+zero, g_idx


def test_parse_override_errors():
    with pytest.raises(ValueError, match="PATTERN"):
        parse_override("bits=3")
    with pytest.raises(ValueError, match="unknown field 'bitz'"):
        parse_override("q_proj:bitz=3", lq.QuantConfig)
    with pytest.raises(ValueError, match="integer"):
        parse_override("q_proj:bits=three", lq.QuantConfig)
    with pytest.raises(ValueError, match="regex"):
        Override("(")
    assert parse_override("q:sym=true,damp=0.1", lq.QuantConfig).changes == {
        "sym": True,
        "damp": 0.1,
    }


def test_padding_never_enters_a_hessian(calib_ids):
    mask = torch.ones_like(calib_ids)
    mask[:, 24:] = 0  # right padding: earlier tokens never attend to it
    outs = []
    for pad_id in (0, 5):
        ids = calib_ids.clone()
        ids[:, 24:] = pad_id
        model = make_tiny_llama().double()
        stats = run_quantize(
            model,
            None,
            ids,
            "gptq",
            _cfg(),
            None,
            attention_mask=mask,
            progress=False,
            hessian_dtype=torch.float64,
        )
        assert all(s["n_tokens"] == int(mask.sum()) for s in stats)
        outs.append(_weights(model))
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_opt_walker_end_to_end(calib_ids):
    model = make_tiny_opt()
    layout = describe_model(model)
    assert layout.architecture == "opt"
    stats = run_quantize(model, None, calib_ids, "gptq", _cfg(), None, progress=False)
    assert [s["name"].split(".")[-1] for s in stats[:6]] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
    ]
    assert all(s["loss"] <= s["rtn_loss"] * 1.5 for s in stats)


class _Interrupt(Exception):
    pass


def _counting_method(calls):
    gptq = get_method("gptq")

    def quantize(W, H, config, context=None):
        calls.append(W.shape)
        return gptq.quantize(W, H, config, context)

    return Method("counting_gptq", lq.QuantConfig, quantize, "gptq")  # used unregistered


def test_resume_after_interruption(tmp_path, calib_ids):
    from safetensors.torch import load_file

    calls: list = []
    method = _counting_method(calls)
    full = make_tiny_llama()
    run_quantize(full, None, calib_ids, method, _cfg(), tmp_path / "full", progress=False)
    calls.clear()

    def stop_after_first(index):
        if index == 0:
            raise _Interrupt

    out = tmp_path / "run"
    with pytest.raises(_Interrupt):
        run_quantize(
            make_tiny_llama(),
            None,
            calib_ids,
            method,
            _cfg(),
            out,
            progress=False,
            on_block_done=stop_after_first,
        )
    assert not out.exists() and (tmp_path / "run.partial" / "state" / "block_0000.json").exists()
    assert len(calls) == 7
    calls.clear()
    resumed = make_tiny_llama()
    stats = run_quantize(resumed, None, calib_ids, method, _cfg(), out, progress=False)
    assert len(calls) == 7  # only block 1 was quantized again
    assert len(stats) == 14
    assert not (tmp_path / "run.partial").exists() and not (out / "state").exists()
    assert torch.equal(resumed(calib_ids[:2]).logits, full(calib_ids[:2]).logits)
    a, b = (
        load_file(str(out / "model.safetensors")),
        load_file(str(tmp_path / "full" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((out / "quant_log.json").read_text())
    assert log["run"]["blocks_resumed"] == 1


def _interrupt_after_first_block(model, calib_ids, out) -> None:
    """An RTN run into ``out`` stopped once its first block is done."""

    def stop(index):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_quantize(model, None, calib_ids, "rtn", _cfg(), out, progress=False, on_block_done=stop)


def test_resume_with_other_settings_is_refused(tmp_path, calib_ids):
    out = tmp_path / "run"
    _interrupt_after_first_block(make_tiny_llama(), calib_ids, out)
    with pytest.raises(ResumeMismatchError, match="other settings"):
        run_quantize(make_tiny_llama(), None, calib_ids, "rtn", _cfg(bits=3), out, progress=False)
    stats = run_quantize(
        make_tiny_llama(), None, calib_ids, "rtn", _cfg(bits=3), out, resume=False, progress=False
    )
    assert len(stats) == 14 and out.exists()


def test_resume_with_other_weights_is_refused(tmp_path, calib_ids):
    out = tmp_path / "run"
    _interrupt_after_first_block(make_tiny_llama(seed=0), calib_ids, out)
    with pytest.raises(ResumeMismatchError):
        run_quantize(make_tiny_llama(seed=1), None, calib_ids, "rtn", _cfg(), out, progress=False)
    with pytest.raises(ResumeMismatchError):
        run_quantize(
            make_tiny_llama(seed=0), None, calib_ids.flip(0), "rtn", _cfg(), out, progress=False
        )


def test_existing_output_is_refused_without_overwrite(tmp_path, calib_ids):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="already exists"):
        run_quantize(make_tiny_llama(), None, calib_ids, "rtn", _cfg(), out, progress=False)
    assert (out / "keep.txt").exists()
    run_quantize(
        make_tiny_llama(), None, calib_ids, "rtn", _cfg(), out, overwrite=True, progress=False
    )
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_bad_inputs(calib_ids):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="calibration ids must be"):
        lq.Calibration(calib_ids[0])
    with pytest.raises(ValueError, match="needs a QuantConfig"):
        run_quantize(model, None, calib_ids, "rtn", {"bits": 4}, None, progress=False)
    with pytest.raises(ValueError, match="unknown quantization method"):
        run_quantize(model, None, calib_ids, "nope", None, None, progress=False)
    with pytest.raises(ValueError, match="'nodevice' is not a device"):
        run_quantize(model, None, calib_ids, "rtn", None, None, device="nodevice")
    with pytest.raises(ValueError, match="the CPU takes no index"):
        run_quantize(model, None, calib_ids, "rtn", None, None, device="cpu:1")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            run_quantize(model, None, calib_ids, "rtn", None, None, device="cuda")
    with pytest.raises(ValueError, match="unsupported model"):
        run_quantize(torch.nn.Sequential(torch.nn.ReLU()), None, calib_ids, "rtn", None, None)
    # a plan is made for one shape of calibration; other windows are refused, not run
    plan = lq.prepare(model, lq.RunSpec("rtn", _cfg(), calibration=lq.CalibrationSpec(nsamples=3)))
    with pytest.raises(ValueError, match="prepared for 3 of 512"):
        lq.quantize_model(model, calib_ids, plan)


def test_the_library_runs_what_the_command_line_runs(tmp_path, calib_ids):
    """The README's few lines: a spec, a plan, the run and its checkpoint, which loads back to
    the very weights the run left in the model."""
    from latticequant.checkpoint import load_quantized

    model = make_tiny_llama()
    spec = lq.RunSpec(
        method="gptq",
        config=_cfg(),
        calibration=lq.CalibrationSpec(nsamples=calib_ids.shape[0], seqlen=calib_ids.shape[1]),
        output=lq.OutputSpec(out=str(tmp_path / "q"), checkpoint_format="gptq_v2"),
        execution=lq.ExecutionSpec(progress=False),
    )
    plan = lq.prepare(model, spec)
    assert plan.format.name == "gptq_v2" and plan.layers.n_quantized == 14
    summary = lq.quantize_model(model, calib_ids, plan)
    assert len(summary) == 14
    loaded = load_quantized(tmp_path / "q")
    ids = calib_ids[:2]
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["quant_method"] == "gptq"


def test_a_block_range_quantizes_only_those_blocks_and_stops_after_them(tmp_path):
    """--blocks 0:1 on three blocks: block 0 gets the codes of a whole run (it sees the same
    inputs), blocks 1 and 2 stay float and are listed as skipped, and block 2 never runs."""
    from tiny import id_stream

    from latticequant.checkpoint import load_quantized

    ids = id_stream(4 * 32, seed=9).view(4, 32)
    full = make_tiny_llama(num_hidden_layers=3)
    run_quantize(full, None, ids, "gptq", _cfg(), progress=False)
    part = make_tiny_llama(num_hidden_layers=3)
    original = {k: v.clone() for k, v in part.state_dict().items()}
    calls = []
    part.model.layers[2].register_forward_pre_hook(lambda m, a: calls.append(1))
    summary = run_quantize(
        part, None, ids, "gptq", _cfg(), tmp_path / "q", blocks=(0, 1), progress=False
    )
    assert not calls and len(summary) == 7 and len(summary.skipped) == 14
    assert set(summary.skipped.values()) == {"outside --blocks 0:1"}
    for k, v in part.state_dict().items():
        if k.startswith("model.layers.0.") and k.endswith("proj.weight"):
            assert torch.equal(v, full.state_dict()[k])
        elif k.startswith(("model.layers.1.", "model.layers.2.")):
            assert torch.equal(v, original[k])
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(
        loaded.model.layers[2].mlp.down_proj.weight, original["model.layers.2.mlp.down_proj.weight"]
    )
    with pytest.raises(ValueError, match="not a range of this model's 3 blocks"):
        run_quantize(make_tiny_llama(num_hidden_layers=3), None, ids, "gptq", _cfg(), blocks=(1, 4))
