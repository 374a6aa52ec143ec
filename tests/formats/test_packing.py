"""GPTQ / SSQR checkpoint formats: exact pack round trips, the ecosystem's bit layout, errors."""

from __future__ import annotations

import pytest
import torch
from cases import BITS, bit_fields, make_result

import latticequant as lq
from latticequant.formats import (
    SSQR_KEYS,
    FormatError,
    csr_to_dense,
    dequantize_gptq,
    dequantize_ssqr,
    format_names,
    get_format,
    pack_codes,
    pack_gptq,
    pack_granularity,
    pack_ssqr,
    packed_size,
    quantize_config_dict,
    unpack_codes,
    unpack_gptq,
    validate_gptq,
)


def bitstream_reference(codes: list[int], bits: int) -> list[int]:
    """Brute force: lay the codes' bits out one by one, least significant first, cut into words."""
    stream = [(c >> b) & 1 for c in codes for b in range(bits)]
    stream += [0] * (-len(stream) % 32)
    words = [sum(stream[32 * w + i] << i for i in range(32)) for w in range(len(stream) // 32)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def three_bit_fields_reference(w0: int, w1: int, w2: int) -> list[int]:
    """The 3-bit GPTQ field table as the ecosystem's loaders read it (32 codes in 3 words).

    Word 0 holds codes 0-9 at shifts 0,3,..,27 and the low 2 bits of code 10 at shift 30; word 1
    holds the high bit of code 10 at bit 0, codes 11-20 at shifts 1,4,..,28 and the low bit of
    code 21 at bit 31; word 2 holds the high 2 bits of code 21 at bits 0-1 and codes 22-31 at
    shifts 2,5,..,29.
    """
    w0, w1, w2 = (w & 0xFFFFFFFF for w in (w0, w1, w2))
    out = [(w0 >> (3 * i)) & 7 for i in range(10)]
    out.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
    out += [(w1 >> (1 + 3 * i)) & 7 for i in range(10)]
    out.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
    out += [(w2 >> (2 + 3 * i)) & 7 for i in range(10)]
    return out


def fp16_reference(r) -> torch.Tensor:
    """The weight a loader reads: scales rounded to float16, the rest exact, in float64."""
    s = r.scales.to(torch.float16).double()
    return s[:, r.g_idx] * (r.codes.double() - r.zeros.double()[:, r.g_idx])


# -- pack_codes / unpack_codes ---------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 95, 100])
def test_pack_matches_bitstream_reference_and_round_trips(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=g)
    packed = pack_codes(codes, bits, dim=1)
    assert packed.dtype == torch.int32 and packed.shape == (3, packed_size(n, bits))
    for r in range(3):
        assert packed[r].tolist() == bitstream_reference(codes[r].tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, n, dim=1), codes)


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_along_every_dim_of_a_3d_tensor(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 37, 3), generator=g)
    for dim in (0, 1, 2, -1):
        packed = pack_codes(codes, bits, dim=dim)
        assert torch.equal(unpack_codes(packed, bits, codes.shape[dim], dim=dim), codes)


def test_extreme_codes_survive_the_sign_bit():
    for bits in BITS:
        maxq = (1 << bits) - 1
        codes = torch.full((64,), maxq)
        packed = pack_codes(codes, bits)
        assert bool((packed == -1).all())  # every word all ones, stored as int32 -1
        assert torch.equal(unpack_codes(packed, bits, 64), codes)


def test_three_bit_layout_matches_the_gptq_field_table():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (96,), generator=g)
    packed = pack_codes(codes, 3).tolist()
    assert len(packed) == 9  # 32 codes per 3 words
    for block in range(3):
        w = packed[3 * block : 3 * block + 3]
        assert three_bit_fields_reference(*w) == codes[32 * block : 32 * block + 32].tolist()


def test_pack_codes_rejects_bad_input():
    with pytest.raises(FormatError, match=r"\[0, 15\]"):
        pack_codes(torch.tensor([0, 16]), 4)
    with pytest.raises(FormatError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([-1, 3]), 3)
    with pytest.raises(FormatError, match="integer"):
        pack_codes(torch.tensor([0.5]), 4)
    with pytest.raises(FormatError, match="bits"):
        pack_codes(torch.tensor([1]), 5)
    with pytest.raises(FormatError, match="words"):
        unpack_codes(torch.zeros(2, dtype=torch.int32), 4, 17)
    with pytest.raises(FormatError, match="int32"):
        unpack_codes(torch.zeros(2, dtype=torch.int64), 4, 16)


def test_granularity():
    assert [pack_granularity(b) for b in BITS] == [16, 32, 8, 4]


# -- pack_gptq / unpack_gptq -----------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("group_size,act_order", [(32, False), (64, True), (-1, False)])
def test_pack_gptq_round_trip(bits, checkpoint_format, group_size, act_order):
    r = make_result(64, 160 if bits != 3 else 192, bits, group_size, act_order, seed=bits)
    t = pack_gptq(r, checkpoint_format=checkpoint_format)
    d_out, d_in = r.codes.shape
    n_groups = r.scales.shape[1]
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (d_in * bits // 32, d_out)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (n_groups, d_out * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (n_groups, d_out)
    assert t["g_idx"].dtype == torch.int32 and torch.equal(t["g_idx"].long(), r.g_idx)
    codes, scales, zeros, g_idx = unpack_gptq(t, bits, checkpoint_format)
    assert torch.equal(codes, r.codes)
    assert torch.equal(zeros, r.zeros.long())
    assert torch.equal(scales, r.scales.to(torch.float16))
    assert torch.equal(g_idx, r.g_idx)
    W = dequantize_gptq(t, bits, checkpoint_format, dtype=torch.float64)
    assert torch.equal(W, fp16_reference(r))
    # the file differs from Q only by the float16 rounding of the scales
    assert torch.allclose(W, r.Q, rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits", BITS)
def test_v1_stores_zeros_minus_one_and_v2_as_is(bits):
    r = make_result(32, 64, bits, group_size=32, seed=7)
    v1 = pack_gptq(r, checkpoint_format="gptq")
    v2 = pack_gptq(r, checkpoint_format="gptq_v2")
    assert torch.equal(v1["qweight"], v2["qweight"]) and torch.equal(v1["scales"], v2["scales"])
    fields_v1 = unpack_codes(v1["qzeros"], bits, 32, dim=1)
    fields_v2 = unpack_codes(v2["qzeros"], bits, 32, dim=1)
    assert torch.equal(fields_v2, r.zeros.t().long())
    assert torch.equal(fields_v1, r.zeros.t().long() - 1)
    # reading a file with the wrong convention shifts every zero by one
    _, _, wrong, _ = unpack_gptq(v2, bits, "gptq")
    assert not torch.equal(wrong, r.zeros.long())


def original_convention_zeros(qzeros: torch.Tensor, bits: int, d_out: int) -> torch.Tensor:
    """A v1 reader written from the original convention, field by field: the bits of field k
    of each packed row (crossing words for 3 bits), plus one. (G, d_out) int64."""
    return torch.tensor([bit_fields(row, d_out, bits) for row in qzeros.tolist()]) + 1


@pytest.mark.parametrize("bits", BITS)
def test_v1_zero_point_zero_is_refused(bits):
    r = make_result(32, 64, bits, group_size=32, seed=1)
    r.zeros[::3, 0] = 0
    with pytest.raises(FormatError, match="gptq_v2"):
        pack_gptq(r, checkpoint_format="gptq")
    v2 = pack_gptq(r, checkpoint_format="gptq_v2")  # v2 stores it as is
    assert torch.equal(unpack_gptq(v2, bits, "gptq_v2")[2], r.zeros.long())


@pytest.mark.parametrize("bits", BITS)
def test_v1_zero_points_read_the_same_by_the_original_convention(bits):
    r = make_result(32, 64, bits, group_size=32, seed=1)  # zeros in 1 .. 2^b - 1
    assert int(r.zeros.min()) >= 1
    v1 = pack_gptq(r, checkpoint_format="gptq")
    assert torch.equal(original_convention_zeros(v1["qzeros"], bits, 32), r.zeros.t().long())
    assert torch.equal(unpack_gptq(v1, bits, "gptq")[2], r.zeros.long())


def test_sym_v1_zero_field_is_half_range_minus_one():
    r = make_result(16, 32, 4, group_size=32, sym=True)
    t = pack_gptq(r)
    assert bool((unpack_codes(t["qzeros"], 4, 16, dim=1) == 7).all())


def test_real_gptq_result_round_trips():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    X = torch.randn(512, 128, generator=g)
    H = X.T @ X / 512
    for bits in BITS:
        cfg = lq.QuantConfig(bits=bits, group_size=32, order="act", static_groups=False)
        r = lq.gptq_quantize(W, H, cfg)
        t = pack_gptq(r, checkpoint_format="gptq_v2")
        codes, _, zeros, g_idx = unpack_gptq(t, bits, "gptq_v2")
        assert torch.equal(codes, r.codes) and torch.equal(g_idx, r.g_idx.long())
        assert torch.equal(zeros, torch.round(r.zeros).long())
        W_file = dequantize_gptq(t, bits, "gptq_v2", dtype=torch.float64)
        assert torch.equal(W_file, fp16_reference(r))


def test_layer_shapes_that_do_not_pack_raise():
    with pytest.raises(FormatError, match="d_in"):
        pack_gptq(make_result(32, 48, 3, group_size=16))  # 3 bits needs 32 rows
    with pytest.raises(FormatError, match="d_in"):
        pack_gptq(make_result(32, 36, 4, group_size=12))  # 4 bits needs 8
    with pytest.raises(FormatError, match="d_out"):
        pack_gptq(make_result(20, 64, 3, group_size=32))
    r = make_result(16, 32, 4)
    r.codes[0, 0] = 16  # an unclipped code
    with pytest.raises(FormatError, match="ssqr"):
        pack_gptq(r)
    r = make_result(16, 32, 4)
    r.zeros[0, 0] = 2.5
    with pytest.raises(FormatError, match="integer"):
        pack_gptq(r)
    with pytest.raises(FormatError, match="checkpoint_format"):
        pack_gptq(make_result(16, 32, 4), checkpoint_format="awq")


def _good_tensors():
    return pack_gptq(make_result(32, 64, 4, group_size=32))


@pytest.mark.parametrize(
    "key,change,pattern",
    [
        ("qzeros", None, "missing tensor 'qzeros'"),
        ("qweight", lambda t: t[:-1], "'qweight'"),
        ("qweight", lambda t: t.to(torch.int64), "'qweight' has dtype"),
        ("scales", lambda t: t[:, :-1], "'scales'"),
        ("qzeros", lambda t: t[:1], "'qzeros'"),
        ("g_idx", lambda t: t[:-1], "'g_idx'"),
        ("g_idx", lambda t: t + 5, "'g_idx' values"),
        ("scales", lambda t: t.to(torch.int32), "'scales' has dtype"),
    ],
)
def test_truncated_or_mismatched_tensor_sets_name_the_key(key, change, pattern):
    t = _good_tensors()
    if change is None:
        del t[key]
    else:
        t[key] = change(t[key])
    with pytest.raises(FormatError, match=pattern):
        unpack_gptq(t, 4, "gptq")


def test_validate_gptq_reports_dimensions():
    shape = validate_gptq(_good_tensors(), 4)
    assert (shape.d_in, shape.d_out, shape.n_groups) == (64, 32, 2)
    with pytest.raises(FormatError):
        validate_gptq(_good_tensors(), 3)  # 8 rows of int32 are not whole 3-bit blocks


# -- SSQR ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_ssqr_dense_plus_csr(bits):
    r = make_result(64, 96, bits, group_size=32, sym=True, seed=bits)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(64, 96, generator=g) < 0.03
    values = torch.randn(64, 96, generator=g, dtype=torch.float64) * 3
    t = pack_ssqr(r, mask, values)
    assert set(t) == set(SSQR_KEYS)
    assert t["outlier_rowptr"].dtype == torch.int32 and t["outlier_rowptr"].shape == (65,)
    assert t["outlier_col"].dtype == torch.int16 and t["outlier_val"].dtype == torch.float16
    assert int(t["outlier_rowptr"][-1]) == int(mask.sum())
    codes, _, _, _ = unpack_gptq(t, bits, "gptq")
    assert bool((codes[mask] == 1 << (bits - 1)).all())  # dense part contributes 0 there
    assert torch.equal(codes[~mask], r.codes[~mask])
    ref_dense = fp16_reference(r)
    ref_dense[mask] = 0
    S = torch.zeros(64, 96, dtype=torch.float64)
    S[mask] = values[mask].to(torch.float16).double()
    assert torch.equal(csr_to_dense(t, 64, 96, torch.float64), S)
    assert torch.equal(dequantize_ssqr(t, bits, "gptq", dtype=torch.float64), ref_dense + S)


def test_ssqr_wide_layers_use_int32_columns():
    r = make_result(8, 32768, 4, group_size=4096, sym=True)
    mask = torch.zeros(8, 32768, dtype=torch.bool)
    mask[3, 32767] = True
    t = pack_ssqr(r, mask, torch.ones(8, 32768))
    assert t["outlier_col"].dtype == torch.int32 and t["outlier_col"].tolist() == [32767]
    assert t["outlier_rowptr"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_csr_errors_name_the_key():
    r = make_result(16, 32, 4, sym=True)
    mask = torch.zeros(16, 32, dtype=torch.bool)
    mask[0, :3] = True
    t = pack_ssqr(r, mask, torch.ones(16, 32))
    t["outlier_val"] = t["outlier_val"][:-1]
    with pytest.raises(FormatError, match="outlier_val"):
        dequantize_ssqr(t, 4)
    del t["outlier_rowptr"]
    with pytest.raises(FormatError, match="outlier_rowptr"):
        dequantize_ssqr(t, 4)


# -- quantize_config.json and the module registry --------------------------------------------


def test_quantize_config_dict_loads_in_transformers():
    from transformers.utils.quantization_config import GPTQConfig

    d = quantize_config_dict(
        bits=3, group_size=128, desc_act=True, sym=False, static_groups=True, damp_percent=0.01
    )
    for key in ("bits", "group_size", "desc_act", "sym", "true_sequential", "pack_dtype"):
        assert key in d
    assert d["quant_method"] == "gptq" and d["checkpoint_format"] == "gptq"
    assert d["pack_dtype"] == "int32" and d["meta"]["static_groups"] is True
    assert d["meta"]["quantizer"][0].startswith("latticequant:")
    cfg = GPTQConfig.from_dict(dict(d))
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym) == (3, 128, True, False)
    assert cfg.format == "gptq"
    v2 = GPTQConfig.from_dict(
        quantize_config_dict(bits=4, group_size=-1, checkpoint_format="gptq_v2")
    )
    assert v2.format == "gptq_v2"


def test_quantize_config_dict_keeps_transformers_valid_damping():
    d = quantize_config_dict(bits=4, group_size=128, damp_percent=0.0)
    assert "damp_percent" not in d and d["meta"]["damp_percent"] == 0.0
    with pytest.raises(FormatError):
        quantize_config_dict(bits=5, group_size=128)
    with pytest.raises(FormatError):
        quantize_config_dict(bits=4, group_size=0)


def test_build_module_registry():
    from latticequant.formats import QuantLinear, SSQRLinear

    assert {"gptq", "ssqr"} <= set(format_names())
    t = _good_tensors()
    m = get_format("gptq").module(t, {"bits": 4, "in_features": 64, "out_features": 32})
    assert isinstance(m, QuantLinear) and (m.in_features, m.out_features) == (64, 32)
    with pytest.raises(FormatError, match="in_features"):
        get_format("gptq").module(t, {"bits": 4, "in_features": 32})
    with pytest.raises(FormatError, match="unknown format"):
        get_format("awq").module(t, {"bits": 4})
    with pytest.raises(FormatError, match="outlier_rowptr"):
        get_format("ssqr").module(t, {"bits": 4})
    with pytest.raises(FormatError, match="bits"):
        get_format("gptq").module(t, {})
    r = make_result(32, 64, 4, sym=True)
    s = pack_ssqr(r, torch.zeros(32, 64, dtype=torch.bool), torch.zeros(32, 64))
    assert isinstance(get_format("ssqr").module(s, {"bits": 4}), SSQRLinear)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptqmodel_reads_our_tensors(checkpoint_format):
    """Second implementation: GPTQModel's own torch layer dequantizes what we packed.

    Runs where GPTQModel is installed (the benchmark environment, ``.venv-bench``).
    """
    gm_torch = pytest.importorskip("gptqmodel.nn_modules.qlinear.torch")
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    for bits in BITS:
        for group_size, act_order, sym in (
            (32, False, False),
            (128, True, False),
            (-1, True, True),
        ):
            r = make_result(96, 256, bits, group_size, act_order, sym=sym, seed=bits)
            if not sym and checkpoint_format == "gptq_v2":
                r.zeros[::5, 0] = 0  # a zero point only v2 can hold
            t = pack_gptq(r, checkpoint_format=checkpoint_format)
            layer = gm_torch.TorchLinear(
                bits=bits,
                group_size=group_size,
                sym=sym,
                desc_act=act_order,
                in_features=256,
                out_features=96,
                bias=False,
                pack_dtype=torch.int32,
                register_buffers=True,
            )
            for key in ("qweight", "qzeros", "scales", "g_idx"):
                getattr(layer, key).data = t[key].clone()
            if checkpoint_format == "gptq":  # what GPTQModel's loader does for v1 files
                convert_gptq_v1_to_v2_format_module(layer, bits=bits, pack_dtype=torch.int32)
            theirs = PackableQuantLinear.dequantize_weight(layer).t()  # float16, (d_out, d_in)
            ours = dequantize_gptq(t, bits, checkpoint_format, dtype=torch.float32)
            assert torch.equal(theirs, ours.to(torch.float16)), (bits, group_size, act_order)
