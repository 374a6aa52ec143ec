#!/usr/bin/env bash
# Build (idempotently) llama.cpp's command-line tools for the GGUF benchmarks, in `.bench/llama.cpp`.
#
# llama.cpp is the reader that judges a GGUF file, so the benchmarks run its own `llama-quantize`,
# `llama-imatrix` and `llama-perplexity`, and `llama-tokenize` to score our reading of a file
# on the very tokens llama.cpp scores. They are built from the llama.cpp sources vendored in the
# `llama-cpp-python` sdist on PyPI (the package registries are the only network a CI machine has),
# with cmake, CPU only. Nothing of this is a dependency of the package or of its tests.
#
# About 15 minutes on 2 cores. The tools land in .bench/llama.cpp/build/bin/.
#
# Usage: bash scripts/llama_cpp_env.sh        (prints the bin folder on its last line)
# Env:   LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default: the number of cores)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"
DIR="$ROOT/.bench/llama.cpp"
SRC="$DIR/src-$VERSION"
BUILD="$DIR/build"
BIN="$BUILD/bin"
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-tokenize)

for tool in cmake gcc g++; do
    command -v "$tool" >/dev/null || { echo "llama_cpp_env.sh: $tool is needed to build llama.cpp; install it first" >&2; exit 1; }
done

have_all() { for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all && [ -f "$BUILD/.version" ] && [ "$(cat "$BUILD/.version")" = "$VERSION" ]; then
    echo "llama_cpp_env.sh: already built ($VERSION)"
    echo "$BIN"
    exit 0
fi

mkdir -p "$DIR"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    tmp="$(mktemp -d "$DIR/download.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    echo "llama_cpp_env.sh: downloading the llama-cpp-python==$VERSION sdist"
    python3 -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$tmp" >/dev/null
    tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
    vendored="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
    [ -f "$vendored/CMakeLists.txt" ] || { echo "llama_cpp_env.sh: no vendor/llama.cpp in the sdist" >&2; exit 1; }
    rm -rf "$SRC"
    mv "$vendored" "$SRC"
fi

echo "llama_cpp_env.sh: building ${TOOLS[*]} with $JOBS jobs (about 15 minutes on 2 cores)"
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TOOLS[@]}"
have_all || { echo "llama_cpp_env.sh: the build did not produce ${TOOLS[*]}" >&2; exit 1; }
echo "$VERSION" >"$BUILD/.version"
echo "llama_cpp_env.sh: ok"
echo "$BIN"
