#!/usr/bin/env bash
# Build the llama.cpp peer the benchmarks compare against (benchmarks/llama_cpp_peer.py):
# llama-cpp-python from source into the venv (this CPU's native build), plus a second copy of
# the same llama.cpp built for AVX2 only, used by `--isa avx2` runs so the peer runs the same
# ISA as the AVX2-mode engines; and llama.cpp's own llama-server and llama-bench from the tree
# that sdist vendors (benchmarks/serve_bench.py --peers llama-server), native and AVX2-only.
#
#   Usage: bash scripts/setup-llama-cpp.sh [--server-only] [VENV_DIR]
#
# Not part of setup-cpu.sh (and not needed by the tests): each build takes 7-9 minutes on 2 cores.
# Output: llama_cpp in VENV (native), build/llama-cpp-avx2/llama_cpp (AVX2 libs, same Python),
# build/llama-server/{native,avx2}/bin/{llama-server,llama-bench} (static binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER_ONLY=0
if [ "${1:-}" = "--server-only" ]; then SERVER_ONLY=1; shift; fi
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
SRC="$WORK/llama_cpp_python-$VERSION"
[ -d "$SRC/vendor/llama.cpp" ] || tar -xzf "$SDIST" -C "$WORK"
AVX2_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
            -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF)

# llama-server + llama-bench, statically linked, from the vendored llama.cpp: $1 = native | avx2.
build_server() {
    local flavour="$1" out="build/llama-server/$1/bin"
    [ -x "$out/llama-server" ] && [ -x "$out/llama-bench" ] && return 0
    local flags=(-DGGML_NATIVE=ON)
    [ "$flavour" = avx2 ] && flags=("${AVX2_FLAGS[@]}")
    cmake -S "$SRC/vendor/llama.cpp" -B "$WORK/build-server-$flavour" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON "${flags[@]}"
    cmake --build "$WORK/build-server-$flavour" -j "$JOBS" --target llama-server llama-bench
    mkdir -p "$out"
    cp "$WORK/build-server-$flavour/bin/llama-server" "$WORK/build-server-$flavour/bin/llama-bench" "$out/"
    "$out/llama-server" --version
}
build_server native
# An AVX2-only twin where the native build would use more (AVX512, AVX-VNNI); elsewhere the
# native build is the AVX2 one and benchmarks/llama_server.py uses it for --isa avx2.
if grep -qw -e avx512f -e avx_vnni /proc/cpuinfo 2>/dev/null; then build_server avx2; fi
if [ "$SERVER_ONLY" = 1 ]; then echo "setup-llama-cpp: llama-server done"; exit 0; fi

# 1. Native build (GGML_NATIVE: every ISA extension this CPU has).
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" CMAKE_ARGS="-DGGML_NATIVE=ON ${COMMON[*]}" \
        "${PIP[@]}" install --no-deps "$SDIST"
    "${PIP[@]}" install "llama-cpp-python==$VERSION"   # its pure-Python dependencies
fi

# 2. AVX2-only build of the same source: x86-64 + AVX/AVX2/FMA/F16C, no AVX512/AVX-VNNI.
if [ ! -e "$AVX2_DIR/llama_cpp/lib/libllama.so" ]; then
    cmake -S "$SRC" -B "$WORK/build-avx2" "${COMMON[@]}" "${AVX2_FLAGS[@]}"
    cmake --build "$WORK/build-avx2" -j "$JOBS"
    cmake --install "$WORK/build-avx2"          # installs into $SRC/llama_cpp/lib
    rm -rf "$AVX2_DIR" && mkdir -p "$AVX2_DIR"
    cp -r "$SRC/llama_cpp" "$AVX2_DIR/llama_cpp"
fi
"$VENV/bin/python" benchmarks/llama_cpp_peer.py --system-info
"$VENV/bin/python" benchmarks/llama_cpp_peer.py --system-info --isa avx2
echo "setup-llama-cpp: done"
