"""Regenerate ``gguf_reference.npz``: ggml's own bytes for a test matrix, type by type.

The bytes come from ggml's C reference quantizers (ggml/src/ggml-quants.c of the llama.cpp
vendored in llama-cpp-python 0.3.36, the first to have Q2_0), compiled into a small shared
library and called through ctypes: ``quantize_row_<type>_ref`` for every type but IQ4_NL, and
``quantize_iq4_nl`` (what llama-quantize runs without an importance matrix) for IQ4_NL.

    LLAMA=.../vendor/llama.cpp
    printf '%s\n' '#include <stdlib.h>' '#include <stdint.h>' \
      'void ggml_abort(const char *f, int l, const char *fmt, ...) { abort(); }' \
      'const char * ggml_type_name(int t) { return "?"; }' \
      'size_t ggml_type_size(int t) { abort(); }' \
      'size_t ggml_row_size(int t, int64_t n) { abort(); }' > stubs.c
    gcc -O2 -shared -fPIC -DNDEBUG -I $LLAMA/ggml/include -I $LLAMA/ggml/src \
      $LLAMA/ggml/src/ggml-quants.c stubs.c -o libggmlq.so -lm
    python tests/formats/data/make_gguf_reference.py libggmlq.so
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

SIZES = {
    "Q8_0": (32, 34),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "IQ4_NL": (32, 18),
    "Q2_0": (64, 18),
    "Q6_K": (256, 210),
    "Q5_K": (256, 176),
    "Q4_K": (256, 144),
    "Q3_K": (256, 110),
    "Q2_K": (256, 84),
}


def test_matrix() -> np.ndarray:
    """8 rows of 512, one kind of row each: Gaussian, heavy-tailed, half zeros, constant,
    positive, small integers, tiny, sparse outliers."""
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
    return W.astype(np.float32)


def quantize(lib: ctypes.CDLL, name: str, W: np.ndarray) -> np.ndarray:
    rows, cols = W.shape
    block, size = SIZES[name]
    out = np.zeros((rows, cols // block * size), dtype=np.uint8)
    ptr = ctypes.c_void_p
    src, dst = W.ctypes.data_as(ptr), out.ctypes.data_as(ptr)
    if name == "IQ4_NL":
        lib.quantize_iq4_nl(src, dst, ctypes.c_int64(rows), ctypes.c_int64(cols), None)
    else:
        fn = f"quantize_row_{name[:2].lower()}_K_ref" if name.endswith("_K") else None
        getattr(lib, fn or f"quantize_row_{name.lower()}_ref")(src, dst, ctypes.c_int64(W.size))
    return out


def main(library: str) -> None:
    lib = ctypes.CDLL(library)
    W = np.ascontiguousarray(test_matrix())
    arrays = {"W": W} | {name: quantize(lib, name, W) for name in SIZES}
    np.savez_compressed(Path(__file__).with_name("gguf_reference.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
