#!/usr/bin/env bash
# Run the CPU kernel and op tests on aarch64, under emulation (issue 21): an arm64 Debian root
# built with debootstrap, run by qemu-user through binfmt_misc, with the aarch64 torch wheel and
# the package (its C++ kernel built by the root's own g++) inside.
#
#   Usage (as root, Debian host): bash scripts/test-aarch64.sh [--prepare | pytest args...]
#   Default: the four kernel/op test files on every Arm path (below). Extra args replace the
#   test selection of the first run, e.g. `bash scripts/test-aarch64.sh tests/test_op.py -x`.
#   --prepare: stages 1-4 only (the root and its venv, no build, no tests).
#
# Not part of the default suite (.ci/run): it takes long, and it says nothing about speed on Arm
# (qemu translates every instruction; NEON and scalar timings here are emulator timings).
#
# Stages, cached under .cache/ (git-ignored), each skipped when its result is already there:
#  1. host tools: debootstrap, qemu-user-static, binfmt-support (apt-get, when missing).
#  2. binfmt_misc: qemu-aarch64 registered, so aarch64 programs run, also the ones dpkg and pip
#     start (qemu-user does not follow execve by itself: without binfmt_misc the second stage
#     of debootstrap cannot run, so this is required, not a shortcut).
#  3. .cache/arm64-root: Debian bookworm arm64, minbase + python3, python3-venv, python3-dev,
#     g++ (debootstrap --foreign on the host, --second-stage inside the root under qemu).
#  4. .cache/arm64-wheels: the aarch64 wheels, downloaded by the host's pip (native speed):
#     torch==2.10.0 (see TORCH_VERSION), its pure-Python dependencies, pytest, hypothesis,
#     numpy, safetensors. Installed into a venv inside the root (/opt/bitcpm-venv) by the host's
#     pip as well (--target with the aarch64 platform tags: unpacking 700 MB under qemu is slow).
#  5. The checkout's tracked and untracked-but-not-ignored files copied into the root
#     (/src/vllm-bitcpm; the host's build outputs stay out), and `pip install
#     --no-build-isolation --no-deps --use-pep517 -e .` there: builds kernels/cpu/ with the root's
#     g++ under qemu. No vLLM (the engine tests are not run here).
#  6. pytest inside the root, one run per ISA cap, so every Arm path runs:
#       VLLM_BITCPM_ISA unset: test_cpu_kernel.py, test_ternary_gemm.py, test_kernel_properties.py
#         (their `isa` fixture runs scalar, neon and neon-dotprod in one process: the float64 and
#         integer oracle tests on each path) and test_op.py (the registered op, best path:
#         neon-dotprod under qemu's default "max" CPU);
#       VLLM_BITCPM_ISA=neon: test_op.py and the cap tests (the registered op on NEON without sdot);
#       VLLM_BITCPM_ISA=scalar: the same (the scalar twin forced).
#
# Measured 2026-12-04 on the 2-core x86 development VM (nice -n 19, other work beside it; table
# in kernels/README.md, "aarch64 under emulation"): stage 3 12 min 17 s, stage 4 187 s (20 s
# cached), stage 5 662 s, stage 6: 502 s (762 passed, 723 skipped: the x86 paths), 54 s (neon
# cap: 58 passed), 36 s (scalar cap: 57 passed). About 30 min from nothing, 20 min with the root.
#
# Why torch 2.10.0 and not 2.13.0 (the x86 pin): PyPI's aarch64 wheels of torch 2.11.0, 2.12.1 and
# 2.13.0 (the ones checked) are CUDA builds: their metadata requires cuda-toolkit /
# nvidia-cudnn-cu13 on Linux, gigabytes of CUDA libraries that libtorch loads at import. 2.10.0's
# aarch64 wheel requires CUDA packages only on x86_64, i.e. it is a CPU build (it reports
# 2.10.0+cpu). PyTorch's own CPU index (download.pytorch.org), where +cpu aarch64 builds of newer
# versions live, is not reachable from the development VM.
set -euo pipefail
{  # parsed whole before it runs, so editing this file during a run cannot change the run
cd "$(dirname "$0")/.."
REPO="$(pwd)"
ROOT="$REPO/.cache/arm64-root"
WHEELS="$REPO/.cache/arm64-wheels"
SUITE="${SUITE:-bookworm}"                  # Python 3.11, as the wheels below
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
TORCH_VERSION="${TORCH_VERSION:-2.10.0}"
PY_TAG=cp311
VENV=/opt/bitcpm-venv                      # inside the root
SRC=/src/vllm-bitcpm                       # inside the root
HOST_PYTHON="${HOST_PYTHON:-$REPO/.venv/bin/python}"   # any host Python with pip
NICE=(nice -n 19)                           # CPU-heavy steps yield to everything else

stage_start=0
stage() { stage_start=$SECONDS; echo "== test-aarch64: $*"; }
stage_done() { echo "== test-aarch64: done in $((SECONDS - stage_start)) s"; }

[ "$(id -u)" = 0 ] || { echo "test-aarch64: needs root (debootstrap, chroot, binfmt_misc)" >&2; exit 2; }

# 1. host tools
stage "host tools"
if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null \
    || ! command -v update-binfmts >/dev/null; then
  apt-get install -y -q debootstrap qemu-user-static binfmt-support
fi
stage_done

# 2. binfmt_misc
stage "binfmt_misc registration of qemu-aarch64"
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 || true
fi
if ! grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
  echo "test-aarch64: cannot register qemu-aarch64 with binfmt_misc (mount it at /proc/sys/fs/binfmt_misc" \
       "and run update-binfmts --enable qemu-aarch64). Without it the root's dpkg and pip cannot start" \
       "aarch64 programs: qemu-user runs one program, not the ones it executes." >&2
  exit 2
fi
stage_done

# Mounts a chroot needs (/proc and /sys for Python and torch, /dev for /dev/null and /dev/shm);
# undone on exit.
MOUNTED=()
mount_in_root() {  # mount_in_root TYPE_OR_--bind SOURCE TARGET
  mkdir -p "$3"
  if ! mountpoint -q "$3"; then
    if [ "$1" = --bind ]; then mount --bind "$2" "$3"; else mount -t "$1" "$2" "$3"; fi
    MOUNTED=("$3" "${MOUNTED[@]}")
  fi
}
unmount_all() { for m in "${MOUNTED[@]}"; do umount -l "$m" || true; done; }
trap unmount_all EXIT
in_root() { "${NICE[@]}" chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 "$@"; }

# 3. the arm64 root
stage "arm64 Debian root ($ROOT)"
if [ ! -e "$ROOT/.bitcpm-root-ready" ]; then
  rm -rf "$ROOT"
  "${NICE[@]}" debootstrap --arch=arm64 --foreign --variant=minbase \
    --include=python3,python3-venv,python3-dev,g++ "$SUITE" "$ROOT" "$MIRROR"
  "${NICE[@]}" chroot "$ROOT" /debootstrap/debootstrap --second-stage
  touch "$ROOT/.bitcpm-root-ready"
fi
mount_in_root proc proc "$ROOT/proc"
mount_in_root sysfs sysfs "$ROOT/sys"  # torch's cpuinfo reads /sys/devices/system/cpu
mount_in_root --bind /dev "$ROOT/dev"
in_root python3 --version
in_root g++ --version | head -1
stage_done

# 4. wheels and the venv
stage "aarch64 wheels and the venv ($VENV in the root)"
SITE="$ROOT$VENV/lib/python3.11/site-packages"
if [ ! -e "$ROOT$VENV/.bitcpm-venv-ready" ]; then
  TAGS=(--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
        --python-version 3.11 --implementation cp --abi "$PY_TAG" --abi abi3 --abi none --only-binary=:all:)
  mkdir -p "$WHEELS"
  # torch without its requirements: pip evaluates their platform markers for the host (x86_64),
  # which would pull the x86 CUDA libraries; the CPU build needs only the pure-Python ones below.
  "${NICE[@]}" "$HOST_PYTHON" -m pip download -q --dest "$WHEELS" "${TAGS[@]}" --no-deps "torch==$TORCH_VERSION"
  "${NICE[@]}" "$HOST_PYTHON" -m pip download -q --dest "$WHEELS" "${TAGS[@]}" filelock "typing-extensions>=4.10" \
    "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" "setuptools>=77" pytest hypothesis numpy safetensors
  in_root python3 -m venv "$VENV"
  "${NICE[@]}" "$HOST_PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --target "$SITE" --upgrade \
    "${TAGS[@]}" --no-deps "$WHEELS"/*.whl
  touch "$ROOT$VENV/.bitcpm-venv-ready"
fi
in_root "$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda' if torch.version.cuda else 'cpu-only')"
stage_done
[ "${1:-}" = --prepare ] && exit 0

# 5. the package, kernel built inside the root
stage "package + CPU kernel built inside the root ($SRC)"
# A fresh copy each run: tar keeps the files' commit-time mtimes, so a kernel library left by an
# earlier run looks newer than changed sources and setuptools would skip the rebuild (seen: an
# old schema's library loaded against a new op definition).
rm -rf "$ROOT$SRC"
mkdir -p "$ROOT$SRC"
git ls-files -z --cached --others --exclude-standard \
  | tar --null --files-from=- --ignore-failed-read -cf - | tar -xf - -C "$ROOT$SRC"
# --use-pep517: Debian's pip 23 would otherwise run `setup.py develop`, which newer setuptools
# turns into a pip call of its own with build isolation (a download of setuptools, offline here).
in_root /bin/sh -c "cd $SRC && $VENV/bin/python -m pip install -q --no-build-isolation --no-deps --no-index --use-pep517 -e ."
in_root /bin/sh -c "cd $SRC && $VENV/bin/python -c 'from vllm_bitcpm.ops import cpu; print(\"kernel:\", cpu.AVAILABLE, cpu.ISA, cpu.isa_available())'"
stage_done

# 6. the tests, per ISA cap
FAILED=0
run_tests() {  # run_tests CAP pytest-args...
  local cap="$1"; shift
  stage "pytest, VLLM_BITCPM_ISA=${cap:-unset}: $*"
  in_root /bin/sh -c "cd $SRC && ${cap:+VLLM_BITCPM_ISA=$cap} $VENV/bin/python -m pytest -q -p no:cacheprovider $*" \
    || FAILED=1
  stage_done
}
# Per cap: the registered op (best path under the cap) and the cap's own tests; torch.compile's
# test (inductor compiles C++ under qemu: minutes) runs once, in the first run.
CAP_TESTS="tests/test_op.py --deselect tests/test_op.py::test_fake_impl_traces_under_torch_compile \
  tests/test_cpu_kernel.py::test_auto_dispatch_is_the_registered_cpu_kernel \
  tests/test_cpu_kernel.py::test_isa_helpers tests/test_cpu_kernel.py::test_isa_cap_limits_every_kernel"
if [ $# -gt 0 ]; then
  run_tests "" "$@"
else
  run_tests "" tests/test_cpu_kernel.py tests/test_ternary_gemm.py tests/test_kernel_properties.py tests/test_op.py
  run_tests neon "$CAP_TESTS"
  run_tests scalar "$CAP_TESTS"
fi
exit $FAILED
}
