"""Triton kernels run by the CPU interpreter (TRITON_INTERPRET=1) against the float reference.

The interpreter executes the same kernel code as a GPU, block by block in numpy, so shapes are
kept small. Triton decides between compiling and interpreting when it is imported, so:
- imported first (``pytest tests/test_kernels.py``), this module sets ``TRITON_INTERPRET=1``
  before importing triton and runs the kernels in process;
- when something else imported triton before (the whole suite: transformers does), the module
  runs itself once in a child process with the variable set, and every test here asserts the
  outcome its twin had there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules:  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed; the kernel tests need it")

from cases import make_result  # noqa: E402

from latticequant.formats import (  # noqa: E402  # noqa: E402
    QuantLinear,
    SSQRLinear,
    dequantize_gptq,
    dequantize_ssqr,
    kernels,  # noqa: E402
    pack_csr,
    pack_gptq,
    pack_ssqr,
)
from latticequant.formats.hptq import HuffmanLinear, chunk_index  # noqa: E402


def _interpreter_ready() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return kernels.interpret_mode() and isinstance(
        triton.language.standard.sum, InterpretedFunction
    )


IN_PROCESS = _interpreter_ready()


@pytest.fixture(scope="module")
def child_run(request):
    """Outcomes of this module's tests run in a child process under the interpreter."""
    if IN_PROCESS:
        return None
    root = request.config.rootpath
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
        + [str(Path(__file__).relative_to(root))],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    outcomes = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(PASSED|FAILED|ERROR) (\S+)", line)
        if m:
            outcomes[m.group(2)] = m.group(1)
    return outcomes, proc.stdout[-6000:] + proc.stderr[-2000:]


def run_here(request, child_run) -> bool:
    """True: run the test body in this process; False: its child twin passed (else fail)."""
    if IN_PROCESS:
        return True
    outcomes, log = child_run
    status = outcomes.get(request.node.nodeid)
    assert status == "PASSED", f"{request.node.nodeid}: {status} under the interpreter\n{log}"
    return False


def _x(m, k, seed=0, dtype=torch.float32):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _close(y, ref, tol=2e-5):
    """Relative to the output's scale: float32 accumulation over K terms."""
    scale = ref.abs().max().clamp_min(1.0)
    return float((y.double() - ref).abs().max() / scale) < tol


# (bits, d_out, d_in, group_size, act_order): odd sizes that still pack, every width and grouping
CASES = [
    (2, 48, 176, 32, True),
    (2, 48, 160, -1, False),
    (3, 64, 160, 128, True),
    (3, 32, 96, 32, False),
    (3, 96, 128, -1, True),
    (4, 40, 168, 128, False),
    (4, 24, 136, 32, True),
    (4, 40, 96, -1, True),
    (8, 20, 100, 32, False),
    (8, 36, 132, 128, True),
]


@pytest.mark.parametrize("bits,d_out,d_in,group_size,act_order", CASES)
def test_quantlinear_kernel_path_matches_dequantized_reference(
    bits, d_out, d_in, group_size, act_order, request, child_run
):
    if not run_here(request, child_run):
        return
    r = make_result(d_out, d_in, bits, group_size, act_order, seed=bits + d_in)
    t = pack_gptq(r, checkpoint_format="gptq_v2")
    bias = torch.randn(d_out, generator=torch.Generator().manual_seed(3))
    m = QuantLinear(t, bits, checkpoint_format="gptq_v2", bias=bias, backend="triton")
    W = dequantize_gptq(t, bits, "gptq_v2", dtype=torch.float64)
    for batch in (1, 16):  # GEMV and GEMM
        x = _x(batch, d_in, seed=batch)
        ref = x.double() @ W.T + bias.double()
        y = m(x)
        assert y.dtype == torch.float32 and y.shape == (batch, d_out)
        assert _close(y, ref), (batch, float((y.double() - ref).abs().max()))


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, False), (2, True)])
def test_compressed_tensors_layer_runs_on_the_kernel(bits, sym, request, child_run):
    """A compressed-tensors layer (float32 scales) runs as a GPTQ module on the kernel path."""
    if not run_here(request, child_run):
        return
    from latticequant.formats import get_format

    fmt = get_format("compressed-tensors")
    r = make_result(48, 128, bits, 32, False, seed=bits, sym=sym)
    t = fmt.pack(r)
    assert ("weight_zero_point" in t) != sym and t["weight_scale"].dtype == torch.float32
    m = fmt.module(t, {"bits": bits, "backend": "triton"})
    W = fmt.dequantize(t, {"bits": bits}, torch.float64)
    for batch in (1, 16):
        x = _x(batch, 128, seed=batch)
        assert _close(m(x), x.double() @ W.T)
    assert m.last_kernel == "triton"


@pytest.mark.parametrize("batch", [1, 3, 8, 16, 64])
def test_batch_sizes_both_paths(batch, request, child_run):
    if not run_here(request, child_run):
        return
    bits, d_out, d_in = 4, 48, 128
    r = make_result(d_out, d_in, bits, 32, act_order=True, seed=5)
    t = pack_gptq(r)
    m = QuantLinear(t, bits)
    W = dequantize_gptq(t, bits, dtype=torch.float64)
    x = _x(batch, d_in, seed=batch)
    xs = x[:, m.perm]
    ref = x.double() @ W.T
    paths = ["auto", "gemm"] + (["gemv"] if batch <= kernels.GEMV_MAX_BATCH else [])
    for path in paths:
        y = kernels.gptq_matmul(
            xs, m.qweight, m.scales, m.zeros, m.g_idx, bits, m.group_size, path=path
        )
        assert _close(y, ref), path


@pytest.mark.parametrize(
    "blocks",
    [
        {"SPLIT_K": 3},  # K split over programs, partial sums by atomics
        {"SPLIT_K": 1, "BLOCK_N": 16, "BLOCK_K": 32},
        {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16},  # GEMM tiles (ignored by GEMV)
    ],
)
@pytest.mark.parametrize("bits", [3, 4])
def test_tile_choices_and_split_k(blocks, bits, request, child_run):
    if not run_here(request, child_run):
        return
    d_out, d_in = 96, 192
    t = pack_gptq(make_result(d_out, d_in, bits, 64, act_order=True, seed=bits))
    m = QuantLinear(t, bits)
    W = dequantize_gptq(t, bits, dtype=torch.float64)
    for batch, path in ((2, "gemv"), (5, "gemm")):
        x = _x(batch, d_in, seed=batch)
        y = kernels.gptq_matmul(
            x[:, m.perm],
            m.qweight,
            m.scales,
            m.zeros,
            m.g_idx,
            bits,
            m.group_size,
            path=path,
            block_sizes=blocks,
        )
        assert _close(y, x.double() @ W.T), (path, blocks)


def test_non_uniform_groups_use_the_per_row_group_lookup(request, child_run):
    if not run_here(request, child_run):
        return
    bits, d_out, d_in = 3, 32, 128
    r = make_result(d_out, d_in, bits, 32, act_order=False, seed=9)
    # uneven groups: sizes 10, 50, 68 (g_idx then is not k // group_size)
    r.g_idx = torch.cat([torch.zeros(10), torch.ones(50), torch.full((68,), 2)]).long()
    r.scales, r.zeros = r.scales[:, :3].clone(), r.zeros[:, :3].clone()
    t = pack_gptq(r)
    m = QuantLinear(t, bits, backend="triton")
    assert m.group_size == 0
    W = dequantize_gptq(t, bits, dtype=torch.float64)
    for batch in (2, 20):
        x = _x(batch, d_in, seed=batch)
        assert _close(m(x), x.double() @ W.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, request, child_run):
    if not run_here(request, child_run):
        return
    bits, d_out, d_in = 4, 32, 128
    t = pack_gptq(make_result(d_out, d_in, bits, 32, act_order=True, seed=2))
    m = QuantLinear(t, bits, backend="triton")
    W = dequantize_gptq(t, bits, dtype=torch.float64)
    for batch in (1, 16):
        x = _x(batch, d_in, seed=batch, dtype=dtype)
        y = m(x)
        assert y.dtype == dtype
        assert _close(y, x.double() @ W.T, tol=2e-2)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05])
def test_ssqr_outlier_pass(bits, rate, request, child_run):
    if not run_here(request, child_run):
        return
    d_out, d_in = 32, 128
    r = make_result(d_out, d_in, bits, 32, act_order=True, sym=True, seed=bits)
    g = torch.Generator().manual_seed(int(rate * 1000))
    mask = torch.rand(d_out, d_in, generator=g) < rate
    t = pack_ssqr(r, mask, torch.randn(d_out, d_in, generator=g) * 3)
    m = SSQRLinear(t, bits, backend="triton")
    W = dequantize_ssqr(t, bits, dtype=torch.float64)
    for batch in (1, 16):
        x = _x(batch, d_in, seed=batch)
        assert _close(m(x), x.double() @ W.T), batch


def test_csr_kernel_alone_against_dense(request, child_run):
    if not run_here(request, child_run):
        return
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(20, 70, generator=g) < 0.2
    mask[3] = False  # an empty row
    S = torch.randn(20, 70, generator=g) * mask
    csr = pack_csr(mask, S)
    x = _x(5, 70)
    out = torch.ones(5, 20)
    kernels.csr_matmul_add(x, csr["outlier_rowptr"], csr["outlier_col"], csr["outlier_val"], out)
    ref = 1 + x.double() @ S.to(torch.float16).double().T
    assert _close(out, ref)


def _hptq_tensors(d_out, d_in, chunk_rows, heavy, seed=0):
    import numpy as np

    from latticequant.formats import huffman

    g = np.random.default_rng(seed)
    if heavy:  # Fibonacci counts: the most skewed code, its longest codes near 20 bits
        fib = [1, 1]
        while sum(fib) + fib[-1] + fib[-2] <= d_out * d_in:
            fib.append(fib[-1] + fib[-2])
        values = np.repeat(np.arange(len(fib)) * 7 - 40, fib)
        values = np.concatenate([values, np.zeros(d_out * d_in - values.size, dtype=np.int64)])
        codes = g.permutation(values).reshape(d_out, d_in).astype(np.int64)
    else:
        codes = np.round(g.standard_normal((d_out, d_in)) * 3).astype(np.int64)
    table = huffman.build_table(codes.reshape(-1), max_length=32)
    stream, _ = huffman.encode(codes.reshape(-1), table)
    t = {
        "hptq_stream": torch.from_numpy(stream),
        "hptq_table": table.to_tensor(),
        "hptq_scale": torch.tensor([0.0123], dtype=torch.float16),
        "hptq_shape": torch.tensor([d_out, d_in], dtype=torch.int32),
        **chunk_index(torch.from_numpy(codes), table, chunk_rows),
    }
    W = t["hptq_scale"].double() * torch.from_numpy(codes).double()
    return t, W, table.max_length


@pytest.mark.parametrize(
    "d_out,d_in,chunk_rows,heavy", [(40, 37, 1, False), (50, 64, 3, True), (17, 48, 6, True)]
)
def test_hptq_kernel_decodes_like_the_cpu_path(d_out, d_in, chunk_rows, heavy, request, child_run):
    if not run_here(request, child_run):
        return
    t, W, L = _hptq_tensors(d_out, d_in, chunk_rows, heavy, seed=d_out)
    assert not heavy or L > 10  # the heavy cases hold long codes
    bias = torch.randn(d_out, generator=torch.Generator().manual_seed(2))
    kernel = HuffmanLinear(t, bias=bias, backend="triton", cache_weight=False)
    cpu = HuffmanLinear(t, bias=bias, backend="torch", cache_weight=False)
    for batch in (1, 20):
        x = _x(batch, d_in, seed=batch)
        y = kernel(x)
        assert kernel.last_kernel == "triton-huffman" and y.shape == (batch, d_out)
        assert _close(y, x.double() @ W.T + bias.double())
        assert _close(y, cpu(x).double()) and cpu.last_kernel == "torch-huffman"
    xh = _x(3, d_in, seed=9, dtype=torch.float16)
    assert kernel(xh).dtype == torch.float16
    assert _close(kernel(xh), xh.double() @ W.T + bias.double(), tol=2e-3)


def _doubling_hadamard(a: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < a:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@pytest.mark.parametrize("a,m", [(1, 3), (2, 1), (16, 9), (64, 9), (512, 3), (1024, 1)])
def test_hadamard_kernel_matches_the_dense_transform(a, m, request, child_run):
    """One pass for orders up to 128, two (Kronecker factors) above; against float64."""
    if not run_here(request, child_run):
        return
    x = torch.randn(3, a, m, generator=torch.Generator().manual_seed(a))
    y = kernels.hadamard_transform(x, a)
    ref = torch.einsum("ij,bjm->bim", _doubling_hadamard(a), x.double())
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert _close(y, ref, tol=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        kernels.hadamard_transform(x, a * 3 if a > 1 else 3)


@pytest.mark.parametrize("d_in, kind", [(576, "ours"), (96, "ours"), (192, "compressed-tensors")])
def test_rotated_layer_kernel_path_matches_the_torch_path(d_in, kind, request, child_run):
    """Ours (``H_a kron F``) and compressed-tensors' block Hadamard (``I_3 kron H_64``)."""
    if not run_here(request, child_run):
        return
    from latticequant.core.rotation import hadamard_rotation
    from latticequant.formats.ct_transform import ct_hadamard_rotation
    from latticequant.formats.rotation import RotatedLinear

    rot = hadamard_rotation(d_in, 4) if kind == "ours" else ct_hadamard_rotation(d_in)
    inner = torch.nn.Linear(d_in, 24, dtype=torch.float32)
    fast = RotatedLinear(rot, inner, backend="triton")
    slow = RotatedLinear(rot, inner, backend="torch")
    x = _x(5, d_in, seed=3)
    ref = (x.double() @ rot.matrix()) @ inner.weight.double().T + inner.bias.double()
    assert _close(fast(x), ref, tol=1e-5) and _close(slow(x), ref, tol=1e-5)
    xh = x.to(torch.float16)  # the transform runs in float32 whatever the input's dtype
    assert fast.rotate(xh).dtype == torch.float32
    assert _close(fast.rotate(xh), slow.rotate(xh).double(), tol=1e-6)


def test_kernel_input_validation(request, child_run):
    if not run_here(request, child_run):
        return
    t = pack_gptq(make_result(32, 64, 4))
    m = QuantLinear(t, 4)
    with pytest.raises(ValueError, match="qweight"):
        kernels.gptq_matmul(_x(2, 64), m.qweight[:-1], m.scales, m.zeros, m.g_idx, 4)
    with pytest.raises(ValueError, match="bits"):
        kernels.gptq_matmul(_x(2, 64), m.qweight, m.scales, m.zeros, m.g_idx, 5)
    with pytest.raises(ValueError, match="GEMV"):
        kernels.gptq_matmul(_x(9, 64), m.qweight, m.scales, m.zeros, m.g_idx, 4, path="gemv")
    h = HuffmanLinear(_hptq_tensors(8, 16, 1, False)[0], cache_weight=False)
    consts = (h.code_limits, h.code_base, h.code_symbols, 0.1, 8, 1)
    with pytest.raises(ValueError, match="offsets"):
        kernels.hptq_matmul(_x(2, 16), h.hptq_stream, h.hptq_offsets[:-1], *consts)
    with pytest.raises(ValueError, match="int32"):
        kernels.hptq_matmul(_x(2, 16), h.hptq_stream, h.hptq_offsets.long(), *consts)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch, request, child_run):
    if not run_here(request, child_run):
        return
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = pack_gptq(make_result(32, 64, 4))
    m = QuantLinear(t, 4)
    with pytest.raises(kernels.KernelUnavailable, match="CUDA"):
        kernels.gptq_matmul(_x(2, 64), m.qweight, m.scales, m.zeros, m.g_idx, 4)
    assert not m._use_kernels(_x(2, 64))  # "auto" falls back to the torch path on the CPU


_SIG_GEMM = dict.fromkeys(("M", "N", "K"), "i32")
_CONST = "constexpr"


def _compile_cases():
    mat = {"qw_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp16", "gidx_ptr": "*i32"}
    gemm = {"x_ptr": "*bf16", **mat, "out_ptr": "*bf16", **_SIG_GEMM}
    gemm_c = dict(TILE_IN_GROUP=True, INPUT_PRECISION=None, DOT_F32=False)
    gemv = {"x_ptr": "*fp16", **mat, "out_ptr": "*fp32", **_SIG_GEMM, "K_PER_PROGRAM": "i32"}
    csr = {"x_ptr": "*bf16", "rowptr_ptr": "*i32", "col_ptr": "*i16", "val_ptr": "*fp16"}
    csr.update({"out_ptr": "*bf16", **_SIG_GEMM})
    tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
    hptq = {"x_ptr": "*bf16", "stream_ptr": "*u8", "offsets_ptr": "*i32", "limits_ptr": "*i64"}
    hptq.update({"base_ptr": "*i64", "symbols_ptr": "*fp32", "out_ptr": "*bf16", **_SIG_GEMM})
    hptq.update({"N_BYTES": "i32", "N_CHUNKS": "i32", "CHUNK_ROWS": "i32", "scale": "fp32"})
    return [
        ("gptq_gemm_kernel", gemm, dict(BITS=3, GROUP_SIZE=128, **gemm_c, **tiles)),
        (
            "gptq_gemm_kernel",
            gemm,
            dict(BITS=4, GROUP_SIZE=1, **{**gemm_c, "TILE_IN_GROUP": False}, **tiles),
        ),
        (
            "gptq_gemv_kernel",
            gemv,
            dict(
                BITS=3,
                GROUP_SIZE=128,
                TILE_IN_GROUP=True,
                ATOMIC=True,
                BLOCK_M=4,
                BLOCK_N=64,
                BLOCK_K=64,
            ),
        ),
        (
            "gptq_gemv_kernel",
            {**gemv, "out_ptr": "*fp16"},
            dict(
                BITS=2,
                GROUP_SIZE=32,
                TILE_IN_GROUP=False,
                ATOMIC=False,
                BLOCK_M=1,
                BLOCK_N=32,
                BLOCK_K=32,
            ),
        ),
        ("csr_add_kernel", csr, dict(BLOCK_M=1, BLOCK_NNZ=32)),
        ("hptq_matmul_kernel", hptq, dict(L=24, L_POW2=32, BLOCK_M=16, BLOCK_C=32, BLOCK_K=32)),
        (
            "hadamard_axis_kernel",
            {"x_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32", "S": "i32"},
            dict(BLOCK_P=128, BLOCK_S=32),
        ),
    ]


def compile_for_sm90(case: int) -> int:
    """Compile one kernel variant for sm_90 (Hopper) with the bundled ptxas; cubin size."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, sig, consts = _compile_cases()[case]
    sig = {**sig, **dict.fromkeys(consts, _CONST)}
    modules = {"hptq": "triton_hptq", "hadamard": "triton_hadamard"}
    module = kernels._kernels(modules.get(name.split("_")[0], "triton_gptq"))
    source = ASTSource(fn=getattr(module, name), signature=sig, constexprs=consts)
    return len(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"])


@pytest.fixture(scope="module")
def compiled_sizes(tmp_path_factory, request):
    """Compile every case in a child process with the interpreter off (compiling needs the
    real ``triton.language``, which an interpreting process has patched)."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no CUDA backend to compile with")
    root = request.config.rootpath
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    code = (
        "import sys, json; sys.path[:0] = ['tests', 'tests/formats']; import test_kernels as t; "
        f"print(json.dumps([t.compile_for_sm90(i) for i in range({len(_compile_cases())})]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(_compile_cases())))
def test_kernels_compile_for_a_gpu_without_one(case, compiled_sizes):
    """The interpreter never compiles; this catches what only the GPU compiler would reject."""
    assert compiled_sizes[case] > 0
