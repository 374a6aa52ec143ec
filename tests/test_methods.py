"""The method registry and the grid methods' layer output, checked against the core directly."""

from __future__ import annotations

import sys

import pytest
import torch

import latticequant as lq
from latticequant import methods
from latticequant.formats import unpack_gptq
from latticequant.methods import LayerQuant, Method, get_method, list_methods, register_method


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
        assert m.config_cls is lq.QuantConfig and m.format == "gptq"


def test_unknown_method_lists_known_names():
    with pytest.raises(ValueError, match="unknown quantization method 'nope'.*gptq"):
        get_method("nope")


def test_register_method_rejects_bad_input():
    with pytest.raises(TypeError):
        register_method("gptq")
    with pytest.raises(ValueError, match="identifier"):
        register_method(Method("bad name", lq.QuantConfig, lambda W, H, c: None, "gptq"))


def test_optional_module_registers_on_demand(tmp_path, monkeypatch):
    (tmp_path / "lq_extra_method.py").write_text(
        "from latticequant.methods import Method, register_method, get_method\n"
        "import latticequant as lq\n"
        "rtn = get_method('rtn').quantize\n"
        "register_method(Method('extra_test', lq.QuantConfig, rtn, 'gptq'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(methods, "_OPTIONAL_MODULES", ("lq_missing_module", "lq_extra_method"))
    try:
        assert get_method("extra_test").name == "extra_test"
        assert "extra_test" in list_methods()
    finally:
        methods._REGISTRY.pop("extra_test", None)
        sys.modules.pop("lq_extra_method", None)


@pytest.mark.parametrize("name", ["rtn", "gptq", "babai"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 32), (2, -1), (8, 64)])
def test_grid_method_matches_core(name, bits, group_size):
    W, H = _problem()
    cfg = lq.QuantConfig(bits=bits, group_size=group_size, order="act")
    out = get_method(name).quantize(W, H, cfg)
    assert isinstance(out, LayerQuant)
    core = getattr(lq, f"{name}_quantize")(W, H, cfg)

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
    R = W - lq.rtn_quantize(W, H, cfg).Q
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
    v2 = get_method("gptq").quantize(W, H, cfg.replace(extra={"checkpoint_format": "gptq_v2"}))
    assert torch.equal(v1.Q, v2.Q)
    z1 = unpack_gptq(v1.tensors, 4, "gptq")[2]
    z2 = unpack_gptq(v2.tensors, 4, "gptq_v2")[2]
    assert torch.equal(z1, z2) and bool((z1 == 8).all())
    assert not torch.equal(v1.tensors["qzeros"], v2.tensors["qzeros"])


@pytest.mark.parametrize(
    "sym,clip,group_size", [(False, True, 32), (True, False, -1), (True, True, 48)]
)
def test_rtn_loss_equals_core_rtn(sym, clip, group_size):
    W, H = _problem(d_in=96)
    H[:, 5] = 0
    H[5, :] = 0  # an input that never fires
    cfg = lq.QuantConfig(bits=3, group_size=group_size, sym=sym, clip=clip)
    ref = lq.rtn_quantize(W, H, cfg)
    assert methods.rtn_loss(W, H, cfg) == pytest.approx(float(ref.loss.sum()), rel=1e-9)
    reuse = methods.rtn_loss(W, H, cfg, ref.scales, ref.zeros)
    assert reuse == pytest.approx(float(ref.loss.sum()), rel=1e-9)
    W32, H32 = W.float(), H.float()
    ref32 = float(lq.rtn_quantize(W32, H32, cfg).loss.sum())
    assert methods.rtn_loss(W32, H32, cfg) == pytest.approx(ref32, rel=1e-4)
