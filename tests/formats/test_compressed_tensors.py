"""The compressed-tensors pack-quantized layout: packing, the signed-code mapping and the
config, each checked against the ``compressed-tensors`` package's own functions."""

from __future__ import annotations

import pytest
import torch
from cases import bit_fields, make_result

from latticequant.formats import FormatError, dequantize_gptq, pack_codes, pack_gptq
from latticequant.formats.compressed_tensors import (
    CT_BITS,
    WeightArgs,
    check_quantization_config,
    compressed_tensors_from_gptq,
    dequantize_compressed_tensors,
    gptq_from_compressed_tensors,
    pack_compressed_tensors,
    pack_compressed_tensors_result,
    pack_int32,
    packed_words,
    parse_weight_args,
    quantization_config_dict,
    quantization_config_for_layers,
    unpack_compressed_tensors,
    unpack_int32,
    validate_compressed_tensors,
    weight_args_for,
)

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized import (  # noqa: E402
    PackedQuantizationCompressor,
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)

D_OUT, D_IN = 24, 96  # d_out not a multiple of 32 // b for most b: zero points pad their last word


def grid(bits, group_size, sym, seed=0, d_out=D_OUT, d_in=D_IN, permuted=False):
    """Random codes, scales, zeros (0 included for asymmetric grids) and g_idx."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else d_in // group_size
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (d_out, d_in), generator=g)
    scales = torch.rand(d_out, n_groups, generator=g, dtype=torch.float64) * 0.05 + 1e-3
    if sym:
        zeros = torch.full((d_out, n_groups), 1 << (bits - 1))
    else:
        zeros = torch.randint(0, maxq + 1, (d_out, n_groups), generator=g)
    g_idx = torch.arange(d_in) // (d_in if group_size == -1 else group_size)
    if permuted:
        g_idx = g_idx[torch.randperm(d_in, generator=g)]
    return codes, scales, zeros, g_idx


def scheme_of(args: WeightArgs) -> QuantizationScheme:
    """The package's scheme for our args (actorder 'group' is refused by the package)."""
    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=args.bits,
            symmetric=args.symmetric,
            strategy=args.strategy,
            group_size=args.group_size,
            actorder=args.actorder,
        ),
    )


# -- dense int32 packing --------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 100])
def test_pack_int32_is_the_package_packing_along_either_dim(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    v = torch.randint(0, 1 << bits, (5, n), generator=g)
    signed = (v - (1 << (bits - 1))).to(torch.int8)
    packed = pack_int32(v, bits, dim=1)
    assert packed.shape == (5, packed_words(n, bits))
    assert torch.equal(packed, pack_to_int32(signed, bits, packed_dim=1))
    assert torch.equal(
        pack_int32(v.t(), bits, dim=0), pack_to_int32(signed.t(), bits, packed_dim=0)
    )
    assert torch.equal(unpack_int32(packed, bits, n, dim=1), v)
    assert torch.equal(unpack_int32(pack_int32(v.t(), bits, dim=0), bits, n, dim=0), v.t())
    got = unpack_from_int32(packed, bits, torch.Size((5, n)), packed_dim=1)
    assert torch.equal(got.long() + (1 << (bits - 1)), v)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_pack_int32_is_the_gptq_bit_stream(bits):
    """Along one line both layouts are the same little-endian stream (GPTQ packs 3 bits so too)."""
    v = torch.randint(0, 1 << bits, (3, 96), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(v, bits, dim=1)
    assert torch.equal(packed, pack_codes(v, bits, dim=1))
    assert bit_fields(packed[1].tolist(), 96, bits) == v[1].tolist()


def test_pack_int32_refuses_values_off_the_grid():
    with pytest.raises(FormatError, match=r"\[0, 15\]"):
        pack_int32(torch.tensor([[16]]), 4, dim=1)
    with pytest.raises(FormatError, match="need 1 words"):
        unpack_int32(torch.zeros(1, 2, dtype=torch.int32), 4, 8, dim=1)


# -- the layer's tensors ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", CT_BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_pack_round_trips_exactly(bits, sym, group_size):
    codes, scales, zeros, g_idx = grid(bits, group_size, sym, seed=bits)
    t = pack_compressed_tensors(codes, scales, zeros, g_idx, bits, sym, torch.float32)
    args = weight_args_for(bits, sym, scales, g_idx)
    assert args.strategy == ("channel" if group_size == -1 else "group")
    assert set(t) == {"weight_packed", "weight_scale", "weight_shape"} | (
        set() if sym else {"weight_zero_point"}
    )
    assert t["weight_packed"].shape == (D_OUT, packed_words(D_IN, bits))
    assert t["weight_shape"].tolist() == [D_OUT, D_IN] and t["weight_shape"].dtype == torch.int64
    if not sym:
        assert t["weight_zero_point"].shape == (packed_words(D_OUT, bits), scales.shape[1])
    c, s, z, gi = unpack_compressed_tensors(t, args)
    assert torch.equal(c, codes) and torch.equal(z, zeros) and torch.equal(gi, g_idx)
    assert torch.equal(s, scales.float())


@pytest.mark.parametrize("bits", CT_BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_package_decompresses_our_tensors_to_our_weight(bits, sym, group_size, scale_dtype):
    """The package's compressor turns our tensors into the weight we compute, bit for bit, in
    the stored scale dtype; and the package's compressor, handed that weight, writes our tensors."""
    codes, scales, zeros, g_idx = grid(bits, group_size, sym, seed=7 * bits)
    t = pack_compressed_tensors(codes, scales, zeros, g_idx, bits, sym, scale_dtype)
    args = weight_args_for(bits, sym, scales, g_idx)
    scheme = scheme_of(args)
    ours = dequantize_compressed_tensors(t, args, dtype=scale_dtype)
    theirs = PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"]
    assert theirs.dtype == scale_dtype and torch.equal(theirs, ours)

    # float32 scales: the weight is the quantizer's Q, and requantizing it gives our tensors.
    t32 = pack_compressed_tensors(codes, scales, zeros, g_idx, bits, sym, torch.float32)
    Q = dequantize_compressed_tensors(t32, args)
    s32 = scales.float()
    assert torch.equal(Q, s32[:, g_idx] * (codes.float() - zeros.float()[:, g_idx]))
    state = {"weight": Q, "weight_scale": s32}
    if not sym:
        state["weight_zero_point"] = (zeros - (1 << (bits - 1))).to(torch.int8)
    again = PackedQuantizationCompressor.compress(state, scheme)
    assert set(again) == set(t32)
    for key in t32:
        assert torch.equal(again[key], t32[key]), key


def test_quant_result_packs_and_act_order_g_idx_needs_leave():
    r = make_result(D_OUT, D_IN, 4, group_size=32, sym=False)
    t = pack_compressed_tensors_result(r, sym=False, scale_dtype=torch.float32)
    args = weight_args_for(4, False, r.scales, r.g_idx)
    assert torch.allclose(dequantize_compressed_tensors(t, args).double(), r.Q, rtol=1e-6)

    p = make_result(D_OUT, D_IN, 4, group_size=32, act_order=True, sym=True)
    with pytest.raises(FormatError, match="removed actorder='group'"):
        pack_compressed_tensors_result(p, sym=True)
    t = pack_compressed_tensors_result(p, sym=True, scale_dtype=torch.float32, allow_g_idx=True)
    args = weight_args_for(4, True, p.scales, p.g_idx)
    assert args.actorder == "group" and t["weight_g_idx"].dtype == torch.int32
    c, _, _, gi = unpack_compressed_tensors(t, args)
    assert torch.equal(c, p.codes) and torch.equal(gi, p.g_idx)
    assert torch.allclose(dequantize_compressed_tensors(t, args).double(), p.Q, rtol=1e-6)


def test_pack_refuses_what_the_layout_cannot_hold():
    codes, scales, zeros, g_idx = grid(4, 32, sym=False)
    with pytest.raises(FormatError, match="bits must be one of"):
        pack_compressed_tensors(codes, scales, zeros, g_idx, 9, False)
    with pytest.raises(FormatError, match="symmetric grid"):
        pack_compressed_tensors(codes, scales, zeros, g_idx, 4, True)
    with pytest.raises(FormatError, match="leave the 4-bit grid"):
        pack_compressed_tensors(codes + 16, scales, zeros, g_idx, 4, False)
    uneven = torch.arange(80) // 32  # groups of 32, 32, 16
    with pytest.raises(FormatError, match="not of one size"):
        pack_compressed_tensors(codes[:, :80], scales, zeros, uneven, 4, False)


def test_validate_names_the_tensor_at_fault():
    codes, scales, zeros, g_idx = grid(4, 32, sym=False)
    args = WeightArgs(bits=4, symmetric=False, strategy="group", group_size=32)
    t = pack_compressed_tensors(codes, scales, zeros, g_idx, 4, False)
    assert validate_compressed_tensors(t, args).n_groups == 3
    cases = [
        ({"weight_packed": t["weight_packed"][:, :-1]}, "'weight_packed' must be"),
        ({"weight_scale": t["weight_scale"][:, :2]}, "'weight_scale' must be"),
        ({"weight_zero_point": t["weight_zero_point"][:-1]}, "'weight_zero_point' must be"),
        ({"weight_shape": torch.tensor([D_OUT])}, "'weight_shape' must hold"),
        ({"weight_g_idx": g_idx.int()}, "'weight_g_idx' is stored"),
    ]
    for change, message in cases:
        with pytest.raises(FormatError, match=message) as e:
            validate_compressed_tensors({**t, **change}, args)
        assert "\n" not in str(e.value)
    missing = dict(t)
    del missing["weight_zero_point"]
    with pytest.raises(FormatError, match="missing tensor 'weight_zero_point'"):
        validate_compressed_tensors(missing, args)
    with pytest.raises(FormatError, match="'weight_zero_point' is stored"):
        validate_compressed_tensors(t, WeightArgs(4, True, "group", 32))
    with pytest.raises(FormatError, match="'weight_packed' must be"):
        validate_compressed_tensors(t, WeightArgs(8, False, "group", 32))


# -- config.json ------------------------------------------------------------------------------

ARGS = [
    WeightArgs(4, True, "group", 128),
    WeightArgs(4, False, "group", 32, "weight"),
    WeightArgs(8, True, "channel"),
    WeightArgs(8, False, "channel", actorder="weight"),
    WeightArgs(3, False, "group", 64),
]


@pytest.mark.parametrize("args", ARGS, ids=str)
def test_config_is_what_the_package_parses_and_writes(args):
    config = quantization_config_dict(args=args, ignore=["lm_head"])
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head"]
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.symmetric, w.strategy, w.group_size) == (
        args.bits,
        args.symmetric,
        args.strategy,
        args.group_size,
    )
    assert w.actorder == args.actorder
    # The package's own serialisation of the parsed config gives back our keys and values.
    dumped = parsed.model_dump()
    for key in ("config_groups", "format", "quantization_status", "ignore", "kv_cache_scheme"):
        assert dumped[key] == config[key], key
    assert parse_weight_args(config["config_groups"]["group_0"]["weights"]) == args


def test_package_refuses_actorder_group():
    config = quantization_config_dict(args=WeightArgs(4, True, "group", 32, "group"))
    with pytest.raises(ValueError, match="actorder='group' has been removed"):
        QuantizationConfig.model_validate(config)


def test_check_config_against_tensors():
    args = WeightArgs(4, False, "group", 32)
    codes, scales, zeros, g_idx = grid(4, 32, sym=False)
    t = pack_compressed_tensors(codes, scales, zeros, g_idx, 4, False)
    state = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in t.items()}
    state["model.embed_tokens.weight"] = torch.zeros(4, 4)
    config = quantization_config_dict(args=args)
    assert check_quantization_config(config, state) == {"model.layers.0.mlp.up_proj": args}

    named = quantization_config_dict(groups={"g": (["re:.*up_proj$"], args)})
    assert list(check_quantization_config(named, state)) == ["model.layers.0.mlp.up_proj"]
    bad = [
        ({**config, "format": "int-quantized"}, "format must be 'pack-quantized'"),
        ({**config, "ignore": ["re:.*mlp.*"]}, "is in the ignore list"),
        (quantization_config_dict(groups={"g": (["re:.*q_proj$"], args)}), "no config group"),
        (quantization_config_dict(args=WeightArgs(4, True, "group", 32)), "is stored but"),
        (quantization_config_dict(args=WeightArgs(4, False, "channel")), "'weight_scale' must"),
    ]
    for cfg, message in bad:
        with pytest.raises(FormatError, match=message) as e:
            check_quantization_config(cfg, state)
        assert "\n" not in str(e.value)


# -- GPTQ tensors <-> pack-quantized ------------------------------------------------------------


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_tensors_convert_exactly(bits, sym, checkpoint_format):
    r = make_result(32, D_IN, bits, group_size=32, sym=sym, seed=bits)
    gptq = pack_gptq(r, checkpoint_format=checkpoint_format)
    ct_tensors = compressed_tensors_from_gptq(gptq, bits, sym, checkpoint_format)
    args = weight_args_for(bits, sym, r.scales, r.g_idx)
    assert ct_tensors["weight_scale"].dtype == torch.float16
    ours = dequantize_compressed_tensors(ct_tensors, args, dtype=torch.float64)
    assert torch.equal(ours, dequantize_gptq(gptq, bits, checkpoint_format, dtype=torch.float64))
    back = gptq_from_compressed_tensors(ct_tensors, args, checkpoint_format)
    for key in gptq:
        assert torch.equal(back[key], gptq[key]), key


def test_config_for_layers_one_scheme_or_one_group_per_scheme():
    a4 = WeightArgs(4, True, "group", 128)
    a8 = WeightArgs(8, False, "channel")
    one = quantization_config_for_layers({"m.q": a4, "m.k": a4}, ignore=["lm_head", "m.v"])
    assert list(one["config_groups"]) == ["group_0"] and one["ignore"] == ["lm_head", "m.v"]
    assert one["config_groups"]["group_0"]["targets"] == ["Linear"]
    mixed = quantization_config_for_layers({"m.q": a4, "m.v": a8, "m.k": a4})
    groups = mixed["config_groups"]
    assert groups["group_0"]["targets"] == ["m.k", "m.q"] and groups["group_1"]["targets"] == [
        "m.v"
    ]
    assert groups["group_1"]["weights"]["num_bits"] == 8
    QuantizationConfig.model_validate(mixed)


def test_act_order_is_said_on_group_grids_and_never_on_channel_grids():
    """An ``actorder`` on a channel strategy is refused by compressed-tensors before 0.15."""
    g = make_result(D_OUT, D_IN, 4, group_size=32, sym=False)
    c = make_result(D_OUT, D_IN, 8, group_size=-1, sym=True)
    assert weight_args_for(4, False, g.scales, g.g_idx, act_order=True).actorder == "weight"
    assert weight_args_for(4, False, g.scales, g.g_idx).actorder is None
    args = weight_args_for(8, True, c.scales, c.g_idx, act_order=True)
    assert args.strategy == "channel" and args.actorder is None
