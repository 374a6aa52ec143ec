"""A pack-quantized checkpoint written by hand from our quantizer loads in plain transformers
(through its compressed-tensors integration) and in compressed-tensors' own checkpoint
dequantizer, and gives the logits of a float model holding our dequantized weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_char_tokenizer, make_tiny_llama

import latticequant as lq
from latticequant.formats.compressed_tensors import (
    WeightArgs,
    check_quantization_config,
    dequantize_compressed_tensors,
    pack_compressed_tensors_result,
    quantization_config_for_layers,
    weight_args_for,
)

pytest.importorskip("compressed_tensors")
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

RTOL = 1e-5


def write_checkpoint(
    folder: Path,
    bits: int,
    sym: bool,
    group_size: int,
    order: str = "natural",
    static_groups: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    weight_dtype: torch.dtype = torch.float32,
    mlp_bits: int | None = None,
):
    """Quantize every decoder linear layer of a tiny Llama with GPTQ on a random Hessian and
    write the checkpoint folder; return the float model holding the weights a loader computes
    (in ``weight_dtype``, then float32) and the layers' args (one scheme) or their map.
    ``mlp_bits`` quantizes the MLP layers at another width: two config groups."""
    model = make_tiny_llama(0)
    reference = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    base = lq.QuantConfig(
        bits=bits, group_size=group_size, sym=sym, order=order, static_groups=static_groups
    )
    g = torch.Generator().manual_seed(1)
    layer_args: dict[str, WeightArgs] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        config = base.replace(bits=mlp_bits) if mlp_bits and ".mlp." in name else base
        W = module.weight.detach()
        X = torch.randn(4 * W.shape[1], W.shape[1], generator=g)
        result = lq.gptq_quantize(W, X.T @ X, config)
        tensors = pack_compressed_tensors_result(result, sym, scale_dtype, allow_g_idx=True)
        args = weight_args_for(config.bits, sym, result.scales, result.g_idx, order != "natural")
        layer_args[name] = args
        W_hat = dequantize_compressed_tensors(tensors, args, dtype=weight_dtype).float()
        if scale_dtype == torch.float32:
            assert torch.equal(W_hat, result.Q)  # the file holds exactly the quantizer's Q
        reference.get_submodule(name).weight.data = W_hat
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": t for key, t in tensors.items()})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config_for_layers(layer_args, ignore=["lm_head"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    make_char_tokenizer().save_pretrained(folder)
    assert check_quantization_config(cfg["quantization_config"], state) == layer_args
    schemes = set(layer_args.values())
    return reference, (schemes.pop() if len(schemes) == 1 else layer_args)


def relative_error(model, reference) -> float:
    ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, reference(ids).logits
    return float((a - b).abs().max() / b.abs().max())


# (bits, sym, group_size, order): act-order with static groups keeps g_idx natural
# (``actorder: weight``).
VARIANTS = [
    (4, True, 32, "natural"),
    (4, False, 32, "natural"),
    (8, True, -1, "natural"),
    (8, False, -1, "natural"),
    (4, True, 32, "act"),
    (8, False, 32, "act"),
    (2, False, 32, "natural"),
    (3, True, -1, "natural"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "b{}-{}-g{}-{}".format(*v))
def test_transformers_loads_the_checkpoint(tmp_path, variant):
    bits, sym, group_size, order = variant
    reference, args = write_checkpoint(tmp_path, bits, sym, group_size, order)
    assert args.actorder == ("weight" if order == "act" else None)
    # dequantize=True: each module decompressed by the package's compressor as it is read.
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    assert relative_error(model, reference) < RTOL
    if sym:  # the default route (decompressed on the first forward) too
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        assert relative_error(model, reference) < RTOL


def test_transformers_default_route_refuses_asymmetric_zero_points(tmp_path):
    """compressed-tensors 0.20 lays out the modules before loading with zero points unpacked,
    (d_out, G), while the checkpoint holds them packed: transformers reports a size mismatch.
    ``CompressedTensorsConfig(dequantize=True)`` loads the same folder (test above)."""
    write_checkpoint(tmp_path, 4, False, 32)
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_scale_dtype_sets_the_arithmetic(tmp_path, scale_dtype):
    """The default route forms ``scale * (q - zp)`` in the model's dtype (float32 here), the
    dequantize route in the stored scale dtype; each matches our dequantize in that dtype."""
    reference, _ = write_checkpoint(tmp_path, 4, True, 32, scale_dtype=scale_dtype)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert relative_error(model, reference) < RTOL
    reference, _ = write_checkpoint(
        tmp_path, 4, True, 32, scale_dtype=scale_dtype, weight_dtype=scale_dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    assert relative_error(model, reference) < RTOL


@pytest.mark.parametrize("sym", [True, False])
def test_package_checkpoint_dequantizer_gives_our_weights(tmp_path, sym):
    """compressed-tensors' own checkpoint converter turns the folder's tensors into dense weights;
    loaded into the float model they give the reference logits."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer,
    )

    reference, _ = write_checkpoint(tmp_path, 4, sym, 32, order="act")
    converter = CompressedTensorsDequantizer(str(tmp_path), dtype=torch.float32)
    dense = converter.validate(load_file(str(tmp_path / "model.safetensors")))
    model = make_tiny_llama(0)
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    assert relative_error(model, reference) < RTOL


def test_actorder_group_is_refused_by_the_loader(tmp_path):
    """A permuted g_idx (act-order refitting each group in processing order) is stored as
    ``weight_g_idx`` with ``actorder: group``, which compressed-tensors 0.20 no longer reads."""
    _, args = write_checkpoint(tmp_path, 4, True, 32, order="act", static_groups=False)
    assert args.actorder == "group"
    with pytest.raises(ValueError, match="actorder='group' has been removed"):
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


def test_two_config_groups_by_module_name(tmp_path):
    """4-bit attention and 8-bit MLP layers: one config group per scheme, naming its modules."""
    reference, layer_args = write_checkpoint(tmp_path, 4, True, 32, mlp_bits=8)
    assert {a.bits for a in layer_args.values()} == {4, 8}
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert relative_error(model, reference) < RTOL


@pytest.mark.parametrize(
    "variant",
    [(4, True, 32, "natural", True), (8, False, -1, "natural", True), (4, False, 32, "act", False)],
    ids=["b4-sym-g32", "b8-asym-channel", "b4-asym-actorder-group"],
)
def test_our_loader_reads_a_checkpoint_written_without_our_section(tmp_path, variant):
    """The folder holds only what llm-compressor writes (no ``latticequant`` section, no
    quant_log): our loader infers the module table from the tensors and the config groups,
    ``actorder: group`` (``weight_g_idx``, which compressed-tensors 0.20 refuses) included."""
    from latticequant.checkpoint import is_quantized_checkpoint, load_quantized

    bits, sym, group_size, order, static_groups = variant
    reference, _ = write_checkpoint(tmp_path, bits, sym, group_size, order, static_groups)
    assert is_quantized_checkpoint(tmp_path)
    assert relative_error(load_quantized(tmp_path), reference) < RTOL
