"""The float-outputs objective and the Hadamard rotation through the whole pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from runs import run_quantize
from safetensors.torch import load_file
from tiny import id_stream, make_char_tokenizer, make_tiny_llama, make_tiny_moe

import latticequant as lq
from latticequant.checkpoint import CheckpointError, load_quantized
from latticequant.formats import dequantize_gptq
from latticequant.formats.rotation import ROTATED_FORMAT, RotatedLinear
from latticequant.methods import Method, UnsupportedConfigError, get_method
from latticequant.pipeline import Override, ResumeMismatchError
from latticequant.pipeline.layout import linear_weight, set_linear_weight
from latticequant.pipeline.offload import load_offloaded
from latticequant.pipeline.target import TargetConfig

SHAPE = dict(
    hidden_size=96, intermediate_size=160, num_key_value_heads=4
)  # 32 x 3 and 32 x 5: a stored factor
BOTH = TargetConfig("float-outputs", "hadamard", seed=3)
UP = "model.layers.0.mlp.up_proj."


def _model(seed=0, **kw):
    return make_tiny_llama(seed, **{**SHAPE, **kw})


def _cfg(bits=4, **kw):
    return lq.QuantConfig(bits=bits, group_size=32, order="act", **kw)


@pytest.fixture(scope="module")
def calib():
    return id_stream(16 * 64).view(16, 64)


@pytest.fixture(scope="module")
def heldout():
    return id_stream(6 * 64, seed=7).view(6, 64)


def _sq_err(model, ref, ids) -> float:
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        b = ref(input_ids=ids, use_cache=False, output_hidden_states=True)
    return float((a.hidden_states[-1] - b.hidden_states[-1]).pow(2).mean())


def test_float_outputs_lowers_the_block_output_error(calib, heldout):
    """Measured on held-out windows: the last block's output against the float model's."""
    ref = _model()
    errs = {}
    for objective in ("layer", "float-outputs"):
        model = _model()
        run_quantize(
            model, None, calib, "gptq", _cfg(2), progress=False, target=TargetConfig(objective)
        )
        errs[objective] = _sq_err(model, ref, heldout)
    assert errs["float-outputs"] < 0.9 * errs["layer"], errs


def _recording(seen: dict):
    """The method a run hands each layer's problem to: records it and rounds to nearest."""
    gptq = get_method("gptq")

    def quantize(W, H, config, context=None):
        lqr = gptq.quantize(W, H, config, context)
        seen[len(seen)] = (W.detach().double().clone(), H.detach().double().clone(), lqr.Q)
        return lqr

    return Method("recording", lq.QuantConfig, quantize, "gptq", check=gptq.check)


def test_the_target_each_layer_gets_is_the_least_squares_match_of_the_float_model(calib):
    """o_proj of block 0: the target handed to the method equals ``lstsq(X~, X W^T)`` with X
    hooked from the float model and X~ from a model whose q, k, v are the run's quantized ones
    (float64, from the activations themselves, not from the pipeline's Gram matrices)."""
    seen: dict = {}
    model = _model()
    run_quantize(
        model,
        None,
        calib,
        _recording(seen),
        _cfg(3),
        progress=False,
        target=TargetConfig("float-outputs", damp=0.0),
        overrides=[Override(r"layers\.1\.", skip=True)],
    )
    # the order the hooks quantize block 0 in: q, k, v, then o_proj
    names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    W_o, _, _ = seen[3]
    float_model, partly = _model(), _model()
    for i, n in enumerate(names[:3]):
        set_linear_weight(partly.get_submodule(f"model.layers.0.self_attn.{n}"), seen[i][2])
    xs = {}

    def grab(key):
        def hook(module, args):
            xs[key] = args[0].reshape(-1, args[0].shape[-1]).double()

        return hook

    for key, m in (("float", float_model), ("quant", partly)):
        h = m.get_submodule("model.layers.0.self_attn.o_proj").register_forward_pre_hook(grab(key))
        with torch.no_grad():
            m(input_ids=calib, use_cache=False)
        h.remove()
    W = (
        linear_weight(float_model.get_submodule("model.layers.0.self_attn.o_proj"))
        .detach()
        .double()
    )
    ref = torch.linalg.lstsq(xs["quant"], xs["float"] @ W.T).solution.T
    assert torch.allclose(W_o, ref, atol=2e-5 * float(ref.abs().max()), rtol=0)
    assert not torch.allclose(W_o, W, atol=1e-3)  # the inputs drifted: the target moved
    # q, k and v of block 0 read the float inputs themselves: their target is W
    W_q = linear_weight(float_model.get_submodule("model.layers.0.self_attn.q_proj")).double()
    assert torch.allclose(seen[0][0], W_q, atol=1e-6)


@pytest.mark.parametrize(
    "reference, batch_size",
    [("previous-block", None), ("previous-block", 5), ("model", None), ("model", 5),
     ("block", None)],
)  # fmt: skip
def test_a_deeper_block_aims_at_its_float_reference(calib, reference, batch_size):
    """q_proj of block 2 of 3: its target is ``lstsq(X~, X W^T)`` with X~ the input of the
    model whose blocks 0 and 1 are the run's quantized ones and X the reference's input of
    the layer, hooked from a model built for it (float64, from the activations): float
    blocks 1 and 2 on the quantized block 0's outputs (``previous-block``), the float model
    (``model``), or the quantized stream itself (``block``: the target is ``W``). For one
    pass per block and for batches alike; each other reference's target is farther off than
    the tolerance by a hundred times (checked too)."""
    seen: dict = {}
    run_quantize(
        _model(num_hidden_layers=3), None, calib, _recording(seen), _cfg(2), progress=False,
        target=TargetConfig("float-outputs", damp=0.0, reference=reference),
        batch_size=batch_size,
    )  # fmt: skip
    names = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    assert len(seen) == 3 * len(names)
    models = {k: _model(num_hidden_layers=3) for k in ("model", "block", "previous-block")}
    for i in range(2 * len(names)):  # blocks 0 and 1, in the order they were solved
        block, name = divmod(i, len(names))
        layer = f"model.layers.{block}.{names[name]}"
        set_linear_weight(models["block"].get_submodule(layer), seen[i][2])
        if block == 0:
            set_linear_weight(models["previous-block"].get_submodule(layer), seen[i][2])
    xs = {}

    def grab(key):
        def hook(module, args):
            xs[key] = args[0].reshape(-1, args[0].shape[-1]).double()

        return hook

    q = "model.layers.2.self_attn.q_proj"
    for key, m in models.items():
        h = m.get_submodule(q).register_forward_pre_hook(grab(key))
        with torch.no_grad():
            m(input_ids=calib, use_cache=False)
        h.remove()
    W = linear_weight(models["model"].get_submodule(q)).detach().double()
    W_t = seen[2 * len(names)][0]
    refs = {k: torch.linalg.lstsq(xs["block"], x @ W.T).solution.T for k, x in xs.items()}
    tol = 2e-5 * float(refs[reference].abs().max())
    assert torch.allclose(W_t, refs[reference], atol=tol, rtol=0)
    for other, ref in refs.items():
        if other != reference:
            assert float((ref - refs[reference]).abs().max()) > 100 * tol, other
    if reference == "block":
        assert torch.allclose(W_t, W, atol=1e-6)


def test_one_pass_a_block_runs_each_float_copy_twice_and_each_block_once(calib, monkeypatch):
    """With all windows in one batch, each block runs once (quantized as it goes) and its
    float copy twice: once on the reference's hidden states for every group's cross Gram,
    once on the quantized stream for the next block's reference. Running the float copy up
    to each group again, as batches must, made ten calls of a block per block."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    calls = []
    forward = LlamaDecoderLayer.forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counting)
    model = _model(num_hidden_layers=3)
    run_quantize(model, None, calib, "gptq", _cfg(3), progress=False, target=BOTH)
    assert len(calls) == 3 * 3
    assert len({id(c) for c in calls}) == 2 * 3  # three blocks and three float copies


def test_rotated_layers_compute_the_dequantized_rotated_weights_on_rotated_inputs(calib, tmp_path):
    model = _model()
    tok = make_char_tokenizer()
    stats = run_quantize(
        model, tok, calib, "gptq", _cfg(4), tmp_path / "q", progress=False, target=BOTH
    )
    assert all(s["rotation"] == "hadamard" and s["objective"] == "float-outputs" for s in stats)
    loaded = load_quantized(tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"  # d_in 160 = 32 x 5
    module = loaded.get_submodule(name)
    assert isinstance(module, RotatedLinear) and (module.a, module.m) == (32, 5)
    t = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
    bits = (t["rot_signs"][:, None].int() >> torch.arange(8)) & 1
    signs = 1.0 - 2.0 * bits.reshape(-1)[:160].double()
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < 32:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    R = signs[:, None] * torch.kron(H, t["rot_factor"]) / 32**0.5
    Q_rot = dequantize_gptq(t, 4, dtype=torch.float64)
    x = torch.randn(4, 160)
    ref = (x.double() @ R) @ Q_rot.T
    assert torch.allclose(module(x).double(), ref, atol=1e-4 * float(ref.abs().max()))
    # what the run fed forward is the same layer in the original basis
    assert torch.allclose(linear_weight(model.get_submodule(name)).double(), Q_rot @ R.T, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=calib[:3]).logits, model(input_ids=calib[:3]).logits,
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip
    qc = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert qc["quant_method"] == "latticequant" and qc["format"] == ROTATED_FORMAT
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    from transformers.quantizers import AutoQuantizationConfig

    with pytest.raises(ValueError, match="latticequant"):  # transformers has no reader for it
        AutoQuantizationConfig.from_dict(cfg)


def _tamper(folder, change) -> None:
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: t.pop(UP + "rot_signs"), "missing tensor"),
        (lambda t: t[UP + "rot_factor"].mul_(2), "not orthogonal"),
    ],
)  # fmt: skip
def test_a_missing_or_corrupt_transform_is_refused(calib, tmp_path, change, match):
    run_quantize(
        _model(), None, calib, "rtn", _cfg(4), tmp_path / "q", progress=False,
        target=TargetConfig(rotate="hadamard"),
    )  # fmt: skip
    _tamper(tmp_path / "q", change)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_quantized(tmp_path / "q")
    assert "\n" not in str(exc.value)


def test_a_rotated_module_under_a_plain_gptq_config_is_refused(calib, tmp_path):
    run_quantize(
        _model(), None, calib, "rtn", _cfg(4), tmp_path / "q", progress=False,
        target=TargetConfig(rotate="hadamard"),
    )  # fmt: skip
    path = tmp_path / "q" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"]["format"] = "gptq"
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rotated"):
        load_quantized(tmp_path / "q")


METHODS = [
    ("rtn", _cfg(3)),
    ("gptq", _cfg(3, refine="cd,scales")),
    ("babai", _cfg(3)),
    ("kbest", get_method("kbest").config_cls(bits=3, group_size=32, beam=2)),
    ("ssqr", None),
    ("hptq", None),
    ("hrtn", None),
]


@pytest.mark.parametrize("method,cfg", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_takes_both_options_and_loads_back(method, cfg, calib, tmp_path):
    model = _model()
    stats = run_quantize(
        model, None, calib[:8], method, cfg, tmp_path / "q", progress=False, target=BOTH
    )
    assert len(stats) == 14
    for s in stats:
        assert s["rotation"] == "hadamard" and s["rotation_bits"] > 0
    if method in ("hptq", "hrtn"):  # the transform's bits come out of the target's budget
        target = get_method(method).config_cls().target_bits
        for s in stats:
            assert s["bits_per_weight"] <= target + 1e-9
    loaded = load_quantized(tmp_path / "q")
    assert sum(isinstance(m, RotatedLinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=calib[:2]).logits, model(input_ids=calib[:2]).logits,
            rtol=2e-4, atol=2e-4,
        )  # fmt: skip


class _Interrupt(Exception):
    pass


def test_float_outputs_resumes_to_the_same_checkpoint(calib, tmp_path):
    full = _model()
    run_quantize(full, None, calib, "gptq", _cfg(3), tmp_path / "full", progress=False, target=BOTH)

    def stop(index):
        if index == 0:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_quantize(
            _model(), None, calib, "gptq", _cfg(3), tmp_path / "run", progress=False,
            target=BOTH, on_block_done=stop,
        )  # fmt: skip
    resumed = _model()
    summary = run_quantize(
        resumed, None, calib, "gptq", _cfg(3), tmp_path / "run", progress=False, target=BOTH
    )
    assert summary.blocks_resumed == 1
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another objective does not resume this run's state
    with pytest.raises(_Interrupt):
        run_quantize(
            _model(), None, calib, "gptq", _cfg(3), tmp_path / "other", progress=False,
            target=BOTH, on_block_done=stop,
        )  # fmt: skip
    with pytest.raises(ResumeMismatchError):
        run_quantize(
            _model(), None, calib, "gptq", _cfg(3), tmp_path / "other", progress=False,
            target=TargetConfig(rotate="hadamard", seed=3),
        )  # fmt: skip


def test_float_outputs_offloaded_equals_in_memory(calib, tmp_path):
    full = _model()
    full.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    run_quantize(full, None, calib, "gptq", _cfg(3), tmp_path / "mem", progress=False, target=BOTH)
    model = load_offloaded(tmp_path / "m")
    run_quantize(
        model, None, calib, "gptq", _cfg(3), tmp_path / "disk", progress=False, target=BOTH
    )
    a = load_quantized(tmp_path / "mem")
    b = load_quantized(tmp_path / "disk")
    with torch.no_grad():
        assert torch.equal(a(input_ids=calib[:2]).logits, b(input_ids=calib[:2]).logits)


def test_batching_does_not_change_the_result(calib):
    one, many = _model(), _model()
    run_quantize(one, None, calib, "gptq", _cfg(3), progress=False, target=BOTH)
    run_quantize(many, None, calib, "gptq", _cfg(3), progress=False, target=BOTH, batch_size=3)
    for (n, a), (_, b) in zip(one.named_parameters(), many.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_what_cannot_be_honoured_is_refused_before_any_forward(calib):
    model = _model(hidden_size=8 * 67, num_attention_heads=4)  # d_in 536 = 8 x 67
    with pytest.raises(UnsupportedConfigError, match="odd factor 67"):
        run_quantize(model, None, calib, "hptq", None, progress=False,
                       target=TargetConfig(rotate="hadamard"))  # fmt: skip
    bad_ones = (
        dict(objective="outputs"),
        dict(rotate="walsh"),
        dict(seed=-1),
        dict(damp=-1),
        dict(objective="float-outputs", reference="float"),
        dict(reference="model"),
    )
    for bad in bad_ones:
        with pytest.raises(ValueError):
            TargetConfig(**bad)


def test_rotation_works_on_mixture_of_experts(calib, tmp_path):
    moe = make_tiny_moe("qwen3_moe")
    stats = run_quantize(
        moe, None, calib, "gptq", lq.QuantConfig(bits=4, group_size=32), tmp_path / "q",
        progress=False, target=TargetConfig(rotate="hadamard"),
    )  # fmt: skip
    assert all(s["rotation"] == "hadamard" for s in stats)
    loaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=calib[:2]).logits, moe(input_ids=calib[:2]).logits,
            rtol=2e-4, atol=2e-4,
        )  # fmt: skip


def test_a_rotated_float_outputs_solve_holds_few_copies_of_the_hessian():
    """One GPTQ layer with the float-outputs objective and the Hadamard rotation, 4096 wide, in
    a fresh process: the peak RSS rises by under 3.5 float64 copies of H (2.6 to 3.1 measured;
    the target's solve, the rotated Hessian and the factor each built in one buffer).
    Whole-matrix rotation passes and float64 copies of H at each step made it 8.0."""
    from peak_memory import peak_copies

    copies = peak_copies(
        4096,
        """
        from latticequant.core.config import QuantConfig
        from latticequant.methods import get_method
        from latticequant.pipeline.target import TargetConfig, solve_layer
        C = H * 0.98
        W = torch.randn(16, n, generator=g)
        method, cfg = get_method("gptq"), QuantConfig(bits=4, group_size=128, order="act")
        t = TargetConfig(rotate="hadamard", seed=0, objective="float-outputs")
        solve_layer(method, W[:, :256], H[:256, :256], cfg, t, "x", C[:256, :256])
        """,
        'solve_layer(method, W, H, cfg, t, "layer", C)',
    )
    assert copies < 3.5, f"the layer held {copies:.2f} float64 copies of H"


def test_compressed_tensors_layers_are_solved_in_the_basis_its_readers_rotate_to():
    """In the compressed-tensors format the method gets ``(W R, R^T H R)`` for the block
    Hadamard the package builds (three Sylvester blocks of 64 on 192 inputs, as 1536 = 3 x 512
    on the protocol model), stores only the pack-quantized tensors of ``Q R``, and the run feeds
    forward ``Q`` in the layer's own basis."""
    ct = pytest.importorskip("compressed_tensors.transform")
    from latticequant.formats import get_format
    from latticequant.pipeline.target import solve_layer

    seen: dict = {}
    method = _recording(seen)
    method = Method("recording", lq.QuantConfig, method.quantize, "compressed-tensors")
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 192, generator=g)
    X = torch.randn(400, 192, generator=g) * torch.linspace(0.1, 3, 192)
    H = X.T @ X / 400
    fmt = get_format("compressed-tensors")
    target = TargetConfig(rotate="hadamard", seed=5)
    lqr = solve_layer(
        method, W, H, _cfg(4, sym=True), target, "model.layers.0.mlp.down_proj", fmt=fmt
    )
    block = ct.deterministic_hadamard_matrix(64, torch.float64) / 8
    R = torch.block_diag(block, block, block)
    W_seen, H_seen, Q_rot = seen[0]
    assert torch.allclose(W_seen, W.double() @ R, atol=1e-5, rtol=0)
    assert torch.allclose(H_seen, R.T @ H.double() @ R, atol=1e-4, rtol=0)
    assert set(lqr.tensors) == {"weight_packed", "weight_scale", "weight_shape"}
    assert lqr.stats["rotation_bits"] == 0.0
    stored = fmt.dequantize(lqr.tensors, {"bits": 4}, torch.float64)
    assert torch.allclose(stored, Q_rot.double(), atol=1e-6, rtol=0)  # Q R is what is stored
    assert torch.allclose(lqr.Q.double(), stored @ R.T, atol=1e-5, rtol=0)  # fed forward: Q
