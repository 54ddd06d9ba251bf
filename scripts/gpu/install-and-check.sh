#!/bin/bash
# On the GPU device machine, from the repo root:  bash .gpu/s/install-and-check.sh [gpu_check.py args...]
# (.gpu/ is made by scripts/gpu/build-bundle.py; the device calls are in scripts/gpu/README.md.)
#
# 1. Reassembles the bundle (vLLM 0.25.1 CUDA-13 build, trimmed, + the deps the device image lacks,
#    already laid out as a site-packages tree) from the parts carried in .gpu/<n>/ by this call and
#    copied to /tmp/bundle by the earlier ones, checks them against SHA256SUMS and unpacks the tree
#    into /tmp/site (once per machine: a rerun while warm skips it).
# 2. PYTHONPATH=/tmp/site:<repo>: vllm from /tmp/site, vllm_bitcpm from the repo; the plugin's
#    entry point comes from /tmp/site/vllm_bitcpm-0.1.0.dist-info/entry_points.txt (no pip install,
#    no CPU-kernel build).
# 3. Preflight (platform, FA3, Machete/Marlin ops, the plugin's kernel choice), then
#    benchmarks/gpu_check.py (stock vs plugin, synthetic BitCPM4-0.5B shape written to /tmp/ckpt).
# Everything is tee'd to $OUT/log.txt; results in $OUT/results/gpu_check.{json,md}.
set -u -o pipefail
: "${OUT:=/tmp/out}"
mkdir -p "$OUT/results"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SITE=${BITCPM_SITE:-/tmp/site}
BUNDLE=${BITCPM_BUNDLE_DIR:-/tmp/bundle}   # where the earlier calls left their parts
CHECK_TIMEOUT=${CHECK_TIMEOUT:-480}
SUMS="$HERE/SHA256SUMS"
[ -f "$SUMS" ] || SUMS="$ROOT/.gpu/s/SHA256SUMS"   # when run as scripts/gpu/install-and-check.sh

main() {
  cd "$ROOT" || return 1
  echo "== $(date -u +%FT%TZ) repo $ROOT, git $(git rev-parse --short HEAD 2>/dev/null) (dirty files: $(git status --porcelain 2>/dev/null | wc -l))"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true

  # .bundle-ok holds the SHA256SUMS of the bundle unpacked there: a rebuilt bundle is unpacked again.
  if [ -f "$SITE/.bundle-ok" ] && cmp -s "$SITE/.bundle-ok" "$SUMS"; then
    echo "== $SITE already unpacked (rerun): skipping the bundle"
  else
    mkdir -p "$BUNDLE"
    for part in .gpu/*/bundle.tar.xz.part-*; do
      [ -f "$part" ] && cp -f "$part" "$BUNDLE"/
    done
    ls -la "$BUNDLE"
    if ! (cd "$BUNDLE" && grep 'part-' "$SUMS" | sha256sum -c -); then
      echo "!! bundle incomplete or corrupt: carry .gpu/1 in one call, .gpu/2 (..) + .gpu/s in the next, while warm"
      return 2
    fi
    rm -rf "$SITE" && mkdir -p "$SITE"
    local t0=$SECONDS
    local parts; parts=$(grep -o 'bundle\.tar\.xz\.part-[0-9]*$' "$SUMS")   # in order, no stale extras
    (cd "$BUNDLE" && cat $parts) | python3 -c "import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall(sys.argv[1], filter='fully_trusted')" "$SITE" || return 3
    cp "$SUMS" "$SITE/.bundle-ok"
    echo "== unpacked $(du -sh "$SITE" | cut -f1) into $SITE in $((SECONDS - t0)) s"
  fi

  export PYTHONPATH="$SITE:$ROOT" PYTHONUNBUFFERED=1
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

  python3 -c 'import vllm, vllm_bitcpm; print("vllm", vllm.__version__, "from", vllm.__file__, "| vllm_bitcpm from", vllm_bitcpm.__file__)' || return 4
  timeout 120 python3 "$HERE/preflight.py" 2>&1 | tee "$OUT/preflight.txt"

  echo "== $(date -u +%T) gpu_check.py (timeout ${CHECK_TIMEOUT}s)"
  local t1=$SECONDS
  timeout -k 15 "$CHECK_TIMEOUT" python3 benchmarks/gpu_check.py --checkpoints /tmp/ckpt --results-dir "$OUT/results" "$@"
  local rc=$?
  echo "== gpu_check.py exit $rc after $((SECONDS - t1)) s"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader || true
  return $rc
}

main "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
