#!/usr/bin/env bash
# Build llama.cpp's tools (llama-quantize, llama-imatrix, llama-perplexity) and its shared libraries from the
# llama-cpp-python==0.3.36 sdist (which vendors llama.cpp), then install llama-cpp-python's Python code from
# the same sdist *without* compiling llama.cpp a second time, pointing it at the libraries built here.
#
#     bash benchmarks/peers/build_llamacpp.sh      # ~25-40 min on 2 shared cores (nice, -j2)
#
# Flags as FACTS.md "GGUF": GGML_NATIVE=OFF with AVX2 (AVX512 where the CPU has it) and AMX off (a native build dies on
# quantized models on these Xeons: "Illegal instruction" / a segfault in ggml_backend_amx_mul_mat).
# Output: runs/peers/build/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/{llama-*,lib*.so}; the .so
# files are also copied into the installed llama_cpp/lib (llama_cpp/_ggml.py loads libggml only from there;
# llama_cpp.py honours LLAMA_CPP_LIB_PATH).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
. .venv/bin/activate
VER=0.3.36
B=runs/peers/build
mkdir -p "$B"
if [ ! -d "$B/llama_cpp_python-$VER" ]; then
    pip download --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$B"
    tar xzf "$B/llama_cpp_python-$VER.tar.gz" -C "$B"
fi
L="$B/llama_cpp_python-$VER/vendor/llama.cpp"
# AVX512 only where the CPU has it (an AVX512 build dies with "Illegal instruction" on the AVX2-only EPYCs).
AVX512=OFF
grep -qw avx512f /proc/cpuinfo && AVX512=ON
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$AVX512 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ ! -x "$L/build/bin/llama-quantize" ] || [ ! -f "$L/build/bin/libllama.so" ]; then
    GEN=""
    command -v ninja >/dev/null && GEN="-G Ninja"
    nice -n "${NICE:-5}" cmake -S "$L" -B "$L/build" $GEN -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON $FLAGS \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    nice -n "${NICE:-5}" cmake --build "$L/build" -j"${JOBS:-2}" --target llama-quantize llama-perplexity llama-imatrix llama
fi
if ! python -c "import llama_cpp" 2>/dev/null; then
    # LLAMA_BUILD=OFF: scikit-build-core installs the Python package only (no second llama.cpp compile).
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" nice -n 5 pip install -c constraints.txt \
        "$B/llama_cpp_python-$VER.tar.gz"
fi
# convert_hf_to_gguf.py imports sentencepiece before it looks for tokenizer.model.
python -c "import sentencepiece" 2>/dev/null || pip install -c constraints.txt sentencepiece
LIBDIR=$(python - <<'EOF'
import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib")
EOF
)
mkdir -p "$LIBDIR"
cp -a "$L"/build/bin/lib*.so* "$LIBDIR"/
python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'system info:', llama_cpp.llama_print_system_info().decode())"
# (not `pip show | grep -q`: grep's early exit breaks pip's pipe, and pipefail turns that into a failure)
python -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.0'))" \
    || { echo "torch is not 2.13.0 any more" >&2; exit 1; }
