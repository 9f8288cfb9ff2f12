#!/usr/bin/env bash
# Compile llama.cpp's reference quantizers (ggml-quants.c of the llama.cpp vendored in llama-cpp-python 0.3.36,
# unpacked by benchmarks/peers/build_llamacpp.sh into runs/peers/build) into runs/peers/kq/libq.so (~10 s, one
# file; gguf_sqnr_stubs.c stands in for the few ggml functions it calls).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
L=$ROOT/runs/peers/build/llama_cpp_python-0.3.36/vendor/llama.cpp
[ -d "$L" ] || { echo "run benchmarks/peers/build_llamacpp.sh first (it unpacks $L)" >&2; exit 1; }
mkdir -p "$ROOT/runs/peers/kq"
gcc -O2 -std=c11 -shared -fPIC -I"$L/ggml/include" -I"$L/ggml/src" "$L/ggml/src/ggml-quants.c" \
    "$(dirname "$0")/gguf_sqnr_stubs.c" -o "$ROOT/runs/peers/kq/libq.so" -lm
