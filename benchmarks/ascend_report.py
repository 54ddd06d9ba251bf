"""The published BitCPM4 report on an Ascend host: stock bf16 vLLM-Ascend vs the ternary path.

    python benchmarks/ascend_report.py --model openbmb/BitCPM4-0.5B     # on an Ascend host
    python benchmarks/ascend_report.py --smoke                          # anywhere (CPU: fallback)

A thin wrapper over benchmarks/report.py (accuracy vs a CPU float32 reference on the 7 prompts,
batch 10 throughput at 32/64/128 tokens, single-request latency, 252-token prefill, weight
memory), which already measures stock vLLM vs vLLM + bitcpm. What it adds for Ascend:

* results go to benchmarks/results/ascend[/smoke] and record the NPU (SoC, torch_npu, CANN,
  which ternary kernel ran: AscendC or torch_npu ``npu_weight_quant_batchmatmul``);
* bf16 engines, one engine per side (thread counts are a CPU notion; NPU runs use one), and the
  KV cache sized from device memory (``--gpu-memory-utilization``) unless given explicitly.

Where ``torch_npu`` does not import it says so and runs the same report on this machine's vLLM
(CPU): the end-to-end check of the script, not an Ascend measurement.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402

ASCEND_RESULTS = HERE / "results" / "ascend"


def npu_info() -> dict | None:
    """SoC and versions of the Ascend stack, or None when torch_npu does not import."""
    try:
        import torch_npu  # noqa: F401
    except Exception:  # noqa: BLE001
        return None
    from vllm_bitcpm.ops import npu

    return {
        "torch_npu": getattr(torch_npu, "__version__", "?"),
        "soc_family": npu.soc_family(),
        "soc_name": _safe(lambda: torch_npu.npu.get_device_name(0)),
        "cann": os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH"),
        "ternary_kernel": npu.KERNEL,
        "weight_format_override": os.environ.get(npu.WEIGHT_FORMAT_ENV),
    }


def _safe(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


def ascend_argv(argv: list[str], on_npu: bool) -> list[str]:
    """report.py's arguments with the Ascend defaults filled in (explicit user flags win)."""
    argv = list(argv)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if "--results-dir" not in given:
        argv += ["--results-dir", str(ASCEND_RESULTS / "smoke" if "--smoke" in given else ASCEND_RESULTS)]
    if "--dtype" not in given:
        argv += ["--dtype", "bfloat16"]
    if on_npu:
        if "--threads" not in given:
            argv += ["--threads", "1"]
        if not given & {"--kv-cache-gib", "--gpu-memory-utilization"}:
            argv += ["--gpu-memory-utilization", "0.9"]
    return argv


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    info = npu_info()
    if info is None:
        print("ascend_report: torch_npu does not import here; running the same report on this "
              "machine's vLLM (the ternary path's CPU fallback) to check the script end to end",
              flush=True)
    else:
        print("ascend_report: Ascend stack: " + json.dumps(info), flush=True)
    args = ascend_argv(argv, on_npu=info is not None)
    report.main(args)
    results = Path(report.parse_args(args).results_dir)
    if (results / "report.json").exists():
        data = json.loads((results / "report.json").read_text())
        data["ascend"] = info
        (results / "report.json").write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
