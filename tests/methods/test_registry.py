"""The method registry and the grid methods' layer output, checked against the core directly."""

from __future__ import annotations

import pytest
import torch

import latticequant as lq
from latticequant.formats import get_format, unpack_gptq
from latticequant.methods import (
    LayerContext,
    LayerQuant,
    Method,
    UnsupportedConfigError,
    get_method,
    list_methods,
    register_method,
    unregister_method,
)


def _problem(d_out=64, d_in=128, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d_in)
    H = X.T @ X / n
    return W, H


def test_core_methods_are_registered():
    names = list_methods()
    for name in ("rtn", "gptq", "babai"):
        assert name in names
        m = get_method(name)
        assert m.config_cls is lq.QuantConfig
        assert m.formats == ("gptq", "gptq_v2", "compressed-tensors", "gguf")


def test_unknown_method_lists_known_names():
    with pytest.raises(ValueError, match="unknown quantization method 'nope'.*gptq"):
        get_method("nope")


def test_register_method_rejects_bad_input():
    with pytest.raises(TypeError):
        register_method("gptq")
    with pytest.raises(ValueError, match="identifier"):
        register_method(Method("bad name", lq.QuantConfig, lambda W, H, c: None, ("gptq",)))


def test_registering_a_method_and_removing_it_leaves_the_registry_as_it_was():
    before = list_methods()
    rtn = get_method("rtn")
    try:
        register_method(Method("extra_test", lq.QuantConfig, rtn.quantize, ("gptq",)))
        assert get_method("extra_test").quantize is rtn.quantize
        assert list_methods() == sorted(before + ["extra_test"])
    finally:
        unregister_method("extra_test")
    assert list_methods() == before
    with pytest.raises(ValueError, match="unknown"):
        get_method("extra_test")


@pytest.mark.parametrize("name", ["rtn", "gptq", "babai"])
def test_grid_methods_refuse_what_the_gptq_format_cannot_store(name):
    method = get_method(name)

    def check(config, d_out, d_in):
        method.refuse(config, method.format(), d_out, d_in)

    for bits in (5, 6, 7):
        with pytest.raises(UnsupportedConfigError, match=f"bits={bits}.*2, 3, 4, 8"):
            check(lq.QuantConfig(bits=bits), 64, 64)
    with pytest.raises(UnsupportedConfigError, match="no-clip.*ssqr, hptq or hrtn"):
        check(lq.QuantConfig(clip=False), 64, 64)
    with pytest.raises(UnsupportedConfigError, match="d_out=48 is not a multiple of 32"):
        check(lq.QuantConfig(bits=3), 48, 64)
    with pytest.raises(UnsupportedConfigError, match="d_in=20 is not a multiple of 8"):
        check(lq.QuantConfig(bits=4), 64, 20)
    for bits in (2, 3, 4, 8):  # and everything it can store passes
        check(lq.QuantConfig(bits=bits), 96, 160 if bits != 3 else 192)


@pytest.mark.parametrize("name", ["rtn", "gptq", "babai"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 32), (2, -1), (8, 64)])
def test_grid_method_matches_core(name, bits, group_size):
    W, H = _problem()
    cfg = lq.QuantConfig(bits=bits, group_size=group_size, order="act")
    out = get_method(name).quantize(W, H, cfg)
    assert isinstance(out, LayerQuant)
    # written as v1 (the default), whose asymmetric zero points start at 1
    core = getattr(lq, f"{name}_quantize")(W, H, cfg, min_zero=1)

    codes, scales, zeros, g_idx = unpack_gptq(out.tensors, bits)
    assert torch.equal(codes, core.codes)
    assert torch.equal(zeros, core.zeros.long())
    assert torch.equal(g_idx, core.g_idx)
    # Q is what a loader reads back: float16 scales, float64 maths here as the reference.
    s16 = core.scales.to(torch.float16).double()
    ref = s16[:, core.g_idx] * (core.codes.double() - core.zeros.double()[:, core.g_idx])
    assert out.Q.dtype == W.dtype and torch.allclose(out.Q, ref, atol=1e-12)
    assert torch.allclose(out.Q, core.Q, rtol=2e-3, atol=1e-6)

    E = W - core.Q
    assert out.stats["loss"] == pytest.approx(float(torch.trace(E @ H @ E.T)), rel=1e-6)
    R = W - lq.rtn_quantize(W, H, cfg, min_zero=1).Q
    assert out.stats["rtn_loss"] == pytest.approx(float(torch.trace(R @ H @ R.T)), rel=1e-6)
    assert out.stats["clipped"] == core.clipped
    assert out.stats["damp"] == core.damp
    # codes, 16-bit scales, packed zeros per group, and the 32-bit g_idx per input column.
    d_out, d_in = W.shape
    g = d_in if group_size == -1 else group_size
    n_groups = -(-d_in // g)
    expected = (d_in * bits * d_out + n_groups * d_out * (16 + bits) + 32 * d_in) / W.numel()
    assert out.stats["bits_per_weight"] == pytest.approx(expected)


def test_gptq_v2_zeros_differ_by_one_from_v1():
    W, H = _problem()
    cfg = lq.QuantConfig(bits=4, group_size=32, sym=True)
    v1 = get_method("gptq").quantize(W, H, cfg)
    v2 = get_method("gptq").quantize(W, H, cfg, LayerContext(get_format("gptq_v2")))
    assert torch.equal(v1.Q, v2.Q)
    z1 = unpack_gptq(v1.tensors, 4, "gptq")[2]
    z2 = unpack_gptq(v2.tensors, 4, "gptq_v2")[2]
    assert torch.equal(z1, z2) and bool((z1 == 8).all())
    assert not torch.equal(v1.tensors["qzeros"], v2.tensors["qzeros"])


def test_kbest_and_refine_layers_are_plain_gptq_and_match_the_core():
    W, H = _problem(d_in=96)
    cfg = get_method("kbest").config_cls(bits=3, group_size=32, order="act", beam=4, sym=True)
    out = get_method("kbest").quantize(W, H, cfg)
    core = lq.kbest_quantize(W, H, cfg, beam=4)
    codes, _, _, _ = unpack_gptq(out.tensors, 3)
    assert torch.equal(codes, core.codes)
    assert out.stats["gptq_loss"] == pytest.approx(lq.gptq_quantize(W, H, cfg).proxy_loss)
    babai = float(lq.babai_quantize(W, H, cfg).loss.sum())
    assert out.stats["loss"] <= babai * (1 + 1e-9)  # Babai's point is among the candidates
    refined = get_method("gptq").quantize(W, H, cfg.replace(refine="cd,scales", refine_sweeps=2))
    assert refined.stats["refine_cd_removed"] >= 0 and refined.stats["refine_scales_removed"] >= 0
    assert refined.stats["loss"] < refined.stats["gptq_loss"]
    E = W - refined.Q
    assert refined.stats["loss"] == pytest.approx(float(torch.trace(E @ H @ E.T)), rel=1e-6)
    assert set(refined.tensors) == {"qweight", "qzeros", "scales", "g_idx"}
    with pytest.raises(UnsupportedConfigError, match="--static-groups"):
        get_method("kbest").check(cfg.replace(static_groups=False), 64, 96)
