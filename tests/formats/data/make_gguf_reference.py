"""Regenerate ``gguf_reference.npz``: ggml's own bytes for a test matrix, type by type.

The bytes come from ggml's C quantizers (ggml/src/ggml-quants.c of the llama.cpp vendored in
llama-cpp-python 0.3.36, the first to have Q2_0), compiled here with the few ggml functions they
call and run through ctypes: ``quantize_row_<type>_ref`` (what llama-quantize writes without an
importance matrix; for IQ4_NL ``quantize_iq4_nl`` without one) and ``quantize_<type>`` with an
importance matrix (keys ``<type>/imatrix``).

    python tests/formats/data/make_gguf_reference.py PATH/TO/vendor/llama.cpp
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

#: name: (ggml type id, weights per block, bytes per block)
TYPES = {
    "Q8_0": (8, 32, 34),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "IQ4_NL": (20, 32, 18),
    "Q2_0": (42, 64, 18),
    "Q6_K": (14, 256, 210),
    "Q5_K": (13, 256, 176),
    "Q4_K": (12, 256, 144),
    "Q3_K": (11, 256, 110),
    "Q2_K": (10, 256, 84),
}

STUBS = """
#include <stdlib.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { abort(); }
const char * ggml_type_name(int type) { return "?"; }
static const int64_t block[64] = { %s };
static const size_t bytes[64] = { %s };
size_t ggml_type_size(int type) { return bytes[type]; }
size_t ggml_row_size(int type, int64_t n) { return bytes[type] * (n / block[type]); }
"""


def build(llama: Path, out: Path) -> ctypes.CDLL:
    block, size = ["0"] * 64, ["0"] * 64
    for tid, b, s in TYPES.values():
        block[tid], size[tid] = str(b), str(s)
    stubs = out / "stubs.c"
    stubs.write_text(STUBS % (", ".join(block), ", ".join(size)))
    lib = out / "libggmlq.so"
    src = llama / "ggml" / "src"
    subprocess.run(
        ["gcc", "-O2", "-shared", "-fPIC", "-DNDEBUG", "-I", str(llama / "ggml" / "include"),
         "-I", str(src), str(src / "ggml-quants.c"), str(stubs), "-o", str(lib), "-lm"],
        check=True,
    )  # fmt: skip
    return ctypes.CDLL(str(lib))


def test_matrix() -> tuple[np.ndarray, np.ndarray]:
    """8 rows of 512, one kind of row each: Gaussian, heavy-tailed, half zeros, constant,
    positive, small integers, tiny, sparse outliers; and an importance per column (some 0)."""
    rng = np.random.default_rng(2026)
    W = rng.standard_normal((8, 512))
    W[1] = rng.standard_t(2, 512) * 0.02
    W[2, :256] = 0
    W[3] = 1.5
    W[4] = np.abs(W[4])
    W[5] = rng.integers(-3, 4, 512)
    W[6] *= 1e-6
    W[7] *= 0.01
    W[7, ::37] *= 100
    importance = rng.gamma(0.5, 1.0, 512)
    importance[:5] = 0
    return W.astype(np.float32), importance.astype(np.float32)


def quantize(lib: ctypes.CDLL, name: str, W: np.ndarray, imatrix=None) -> np.ndarray:
    rows, cols = W.shape
    _, block, size = TYPES[name]
    out = np.zeros((rows, cols // block * size), dtype=np.uint8)
    ptr = ctypes.c_void_p
    src, dst = W.ctypes.data_as(ptr), out.ctypes.data_as(ptr)
    low = name[:2].lower() + "_K" if name.endswith("_K") else name.lower()
    if imatrix is not None or name == "IQ4_NL":
        qw = None if imatrix is None else imatrix.ctypes.data_as(ptr)
        getattr(lib, f"quantize_{low}")(src, dst, ctypes.c_int64(rows), ctypes.c_int64(cols), qw)
    else:
        getattr(lib, f"quantize_row_{low}_ref")(src, dst, ctypes.c_int64(W.size))
    return out


def main(llama: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(llama), Path(tmp))
        W, importance = (np.ascontiguousarray(a) for a in test_matrix())
        arrays = {"W": W, "importance": importance}
        for name in TYPES:
            arrays[name] = quantize(lib, name, W)
            arrays[f"{name}/imatrix"] = quantize(lib, name, W, importance)
    np.savez_compressed(Path(__file__).with_name("gguf_reference.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
