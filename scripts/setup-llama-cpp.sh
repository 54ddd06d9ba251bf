#!/usr/bin/env bash
# Build the llama.cpp peer the benchmarks compare against (benchmarks/llama_cpp_peer.py):
# llama-cpp-python from source into the venv (this CPU's native build), plus a second copy of
# the same llama.cpp built for AVX2 only, used by `--isa avx2` runs so the peer runs the same
# ISA as the AVX2-mode engines.   Usage: bash scripts/setup-llama-cpp.sh [VENV_DIR]
#
# Not part of setup-cpu.sh (and not needed by the tests): each build takes 7-9 minutes on 2 cores.
# Output: llama_cpp in VENV (native) and build/llama-cpp-avx2/llama_cpp (AVX2 libs, same Python).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"
WORK="build/llama-cpp-src"
AVX2_DIR="build/llama-cpp-avx2"
PIP=("$VENV/bin/python" -m pip)
COMMON=(-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
        -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF -DCMAKE_BUILD_TYPE=Release)

"${PIP[@]}" install "gguf"
mkdir -p "$WORK"
"${PIP[@]}" download --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION"
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"

# 1. Native build (GGML_NATIVE: every ISA extension this CPU has).
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" CMAKE_ARGS="-DGGML_NATIVE=ON ${COMMON[*]}" \
        "${PIP[@]}" install --no-deps "$SDIST"
    "${PIP[@]}" install "llama-cpp-python==$VERSION"   # its pure-Python dependencies
fi

# 2. AVX2-only build of the same source: x86-64 + AVX/AVX2/FMA/F16C, no AVX512/AVX-VNNI.
if [ ! -e "$AVX2_DIR/llama_cpp/lib/libllama.so" ]; then
    tar -xzf "$SDIST" -C "$WORK"
    SRC="$WORK/llama_cpp_python-$VERSION"
    cmake -S "$SRC" -B "$WORK/build-avx2" "${COMMON[@]}" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
        -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF
    cmake --build "$WORK/build-avx2" -j "$JOBS"
    cmake --install "$WORK/build-avx2"          # installs into $SRC/llama_cpp/lib
    rm -rf "$AVX2_DIR" && mkdir -p "$AVX2_DIR"
    cp -r "$SRC/llama_cpp" "$AVX2_DIR/llama_cpp"
fi
"$VENV/bin/python" benchmarks/llama_cpp_peer.py --system-info
"$VENV/bin/python" benchmarks/llama_cpp_peer.py --system-info --isa avx2
echo "setup-llama-cpp: done"
