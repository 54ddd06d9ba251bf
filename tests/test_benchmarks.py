"""The benchmark suite runs end to end on a tiny synthetic model and its JSON makes sense.

One ``benchmarks/report.py --smoke`` run (one engine child per side: stock, plugin, plugin-int8;
accuracy and throughput on the same engine) feeds every check; the rest renders from its JSON
or fails before any engine starts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIGURES

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SIDES = ("stock", "plugin", "plugin-int8")


def _benchmark_module(name: str):
    """Import a benchmarks/ script as a module (they import each other by bare name)."""
    import importlib

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("report")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "report.py"), "--smoke", "--results-dir", str(out),
         "--checkpoints", str(out / "checkpoints")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text()), out, proc.stdout


def test_smoke_writes_every_output(smoke):
    report, out, stdout = smoke
    for name in ("report.json", "REPORT.md", "README_results.md", "report-accuracy.png", "report-throughput.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| top-1 match |" in stdout and "prefill, 252-token prompt" in stdout
    readme = (out / "README_results.md").read_text()
    assert readme.startswith("## Results") and report["throughput"]["machine"]["cpu"] in readme
    assert report["smoke"] and report["synthetic"] == "tiny"


def test_smoke_machine_and_settings_are_recorded(smoke):
    report, _, _ = smoke
    tp = report["throughput"]
    assert {"cpu", "cores", "isa", "torch", "vllm", "platform"} <= set(tp["machine"])
    assert tp["machine"]["platform"] == "cpu"
    assert tp["settings"]["dtype"] == "bfloat16" and tp["settings"]["max_model_len"] == 1024
    for side in SIDES:  # one model thread each, pinned to one of this machine's CPUs
        assert int(tp["runs"]["1"][side]["model_threads_bind"]) in os.sched_getaffinity(0)
        assert tp["runs"]["1"][side]["model_threads"] == 1  # the in-process engine really ran 1 thread


def test_smoke_accuracy_fields(smoke):
    report, _, _ = smoke
    acc = report["accuracy"]
    assert len(acc["prompts"]) == 7 and acc["reference"]["kind"] == "minicpm"
    assert set(acc["candidates"]) == set(SIDES)
    for side, cand in acc["candidates"].items():
        assert "error" not in cand, (side, cand.get("error"))
        s = cand["summary"]
        for key in ("top1_match_rate", "top5_inclusion_rate", "mean_top1_prob_rel_error"):
            assert 0.0 <= s[key] <= 1.0, (side, key, s[key])
        assert 0 <= s["mean_top10_overlap"] <= 10
        # Full-vocabulary log-probs came back, so the full-distribution metrics exist.
        assert s["mean_kl"] is not None and 0.0 <= s["mean_kl"] < 1.0, (side, s["mean_kl"])
        assert 0.0 <= s["max_abs_error"] <= 1.0 and s["mean_rmse"] >= 0.0
        vocab = json.loads((Path(report["model"]) / "config.json").read_text())["vocab_size"]
        assert cand["logprobs_returned"] == [vocab] * 7
        for row in cand["per_prompt"]:
            assert 0.0 < row["ref_top1_prob"] <= 1.0 and 0.0 < row["cand_top1_prob"] <= 1.0
            assert len(row["top10"]) == 10
    summary = acc["candidates"]["plugin"]["summary"]
    FIGURES.append(f"benchmark smoke (tiny, bf16) plugin vs float32: top-1 {summary['top1_match_rate']:.0%}, "
                   f"mean KL {summary['mean_kl']:.1e}")


def test_smoke_throughput_fields(smoke):
    report, _, _ = smoke
    runs = report["throughput"]["runs"]["1"]
    for side in SIDES:
        r = runs[side]
        assert "error" not in r, (side, r.get("error"))
        for key in ("batch10_mt4_output_tok_per_s", "batch10_mt4_input_tok_per_s", "single_tok_per_s",
                    "prefill_tok_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (side, key, r[key])
        assert r["kv_cache_tokens"] > 0 and r["max_concurrency"] > 0 and r["init_seconds"] > 0
    stock, plugin = runs["stock"], runs["plugin"]
    assert plugin["weight_gib"] < stock["weight_gib"]
    assert plugin["linear_weight_mib"] < 0.2 * stock["linear_weight_mib"]
    assert plugin["packed_layers"] > 0 and stock["packed_layers"] == 0
    assert 2.0 < plugin["bits_per_packed_weight"] < 2.2
    ratios = report["throughput"]["ratios"]["1"]["plugin"]
    assert ratios["weight_gib"] == pytest.approx(plugin["weight_gib"] / stock["weight_gib"])


def test_report_rerenders_from_json(smoke, tmp_path):
    _, out, _ = smoke
    report_script = _benchmark_module("report")
    report_script.main(["--from-json", str(out / "report.json"), "--results-dir", str(tmp_path)])
    assert (tmp_path / "README_results.md").read_text() == (out / "README_results.md").read_text()
    assert (tmp_path / "report-accuracy.png").stat().st_size > 0


def test_transformers_reference_fails_clearly_without_modelling_code(smoke):
    report, _, _ = smoke
    accuracy = _benchmark_module("accuracy")
    with pytest.raises(SystemExit, match="--reference transformers: cannot load"):
        accuracy.reference_logits(report["model"], [[1, 2, 3]], "transformers", "float32", 1024, True)


def test_inner_loop_ceiling_runs(tmp_path):
    """benchmarks/inner_loop_ceiling.py builds its C++ loops and reports every variant this CPU runs:
    12 AVX2 loops everywhere with AVX2 (4 float, 8 integer), 6 more on AVX512-BF16 CPUs."""
    from vllm_bitcpm.ops import cpu as cpu_kernel

    if cpu_kernel.CPU_ISA is None or cpu_kernel.CPU_ISA.startswith("scalar"):
        pytest.skip("the measured loops need AVX2")
    out = tmp_path / "ceiling.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "inner_loop_ceiling.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    expected = 18 if cpu_kernel.CPU_ISA.startswith("avx512bf16") else 12
    assert len(rows) == expected and all(r["gweights_per_s"] > 0 and r["model_ms_per_token"] > 0 for r in rows)
    assert sum(r["isa"] == "avx2" for r in rows) == 12
    assert any(r["variant"].startswith("fp32 lookup table, column triples") for r in rows)
    assert {r["variant"].split(",")[0] for r in rows if r["variant"].startswith("int")} == {"int8", "int16"}


def test_prefill_gemm_sweep_runs(tmp_path):
    """benchmarks/prefill_gemm.py: every side timed per layer shape and M, summary ratios, plot."""
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "prefill_gemm.py"), "--tokens", "1", "12", "--threads", "1",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 * 4 and {r["layer"] for r in result["rows"]} == {"qkv", "o", "gate_up", "down"}
    for row in result["rows"]:
        assert all(row[f"{side}_ms"] > 0 for side in ("plugin", "plugin-int16", "plugin-int8", "stock-bf16", "stock-fp32"))
    assert [s["tokens"] for s in result["summary"]] == [1, 12] and result["isa_paths"]["bitcpm_kernel_isa"]
    assert out.with_suffix(".png").exists()


def test_instruction_counts_runs(tmp_path):
    """benchmarks/instruction_counts.py counts the AVX2 kernel under callgrind (one small case)."""
    import shutil

    from vllm_bitcpm.ops import cpu as cpu_kernel

    if shutil.which("valgrind") is None or "avx2" not in cpu_kernel.isa_available():
        pytest.skip("needs valgrind and an AVX2 CPU")
    out = tmp_path / "counts.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "instruction_counts.py"), "--shapes", "o", "--tokens", "1",
                           "--calls", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    # the decode loop alone is ~12 instructions per 32 weights; the whole call cannot be below it
    assert row["isa"] == "avx2" and row["M"] == 1 and 12 < row["per_32_weight_token_products"] < 100


def test_smoke_report_says_why_llama_cpp_did_not_run(smoke):
    _, out, _ = smoke
    assert "llama.cpp peer not measured: disabled (--llama-cpp no)" in (out / "REPORT.md").read_text()


def test_avx2_targets_and_peer_tables_render_from_measured_sides(smoke):
    """The AVX2 section judges each target on sides of the same run; a missing baseline shows '-'."""
    report_script = _benchmark_module("report")
    report, _, _ = smoke
    report = json.loads(json.dumps(report))
    runs = report["throughput"]["runs"]["1"]
    runs["llama.cpp-f16"] = {"decode_b1_tok_per_s": 2 * runs["plugin"]["decode_b1_tok_per_s"],
                             "prefill_tok_per_s": runs["plugin-int8"]["prefill_tok_per_s"] / 2, "weight_gib": 0.2}
    runs["llama.cpp-q8_0"] = {"error": "llama-cpp-python is not installed (bash scripts/setup-llama-cpp.sh)"}
    report["throughput"]["isa_mode"] = "avx2"
    text = report_script.report_markdown(report)
    assert "## AVX2 targets" in text and "## CPU targets" not in text
    table = report_script.avx2_targets_table(report)
    decode_row = next(line for line in table.splitlines() if "decode, batch 1" in line and "| vLLM + bitcpm |" in line)
    assert decode_row.endswith("| no |")  # the plugin at half of llama.cpp misses 0.8x
    prefill_int8 = next(line for line in table.splitlines() if "prefill" in line and "bitcpm int8" in line)
    assert prefill_int8.endswith("| yes |")
    assert "stock vLLM float32 (-)" in table and table.count("| - |") >= 2  # no float32 side in the smoke run
    peers = report_script.peer_table(report)
    assert "vs llama.cpp TQ2_0" in peers and "0.50x" in peers and "llama.cpp TQ2_0 + Q8_0 head" not in peers


def test_gpu_check_refuses_a_machine_without_gpu():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "vLLM found no GPU on this machine" in proc.stderr


def test_gpu_check_runs_on_cpu_stand_in(tmp_path):
    """The GPU check's code path on CPU (tiny model): the plugin side on vLLM's int4 kernel where
    this vLLM build has one, else dense; both sides measured and compared."""
    import torch
    import vllm._custom_ops  # noqa: F401

    backend = "int4" if hasattr(torch.ops._C, "cpu_gemm_wna16") else "dense"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--cpu", "--backend", backend,
                           "--results-dir", str(tmp_path), "--checkpoints", str(tmp_path / "checkpoints")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check-cpu.json").read_text())
    assert result["cpu_stand_in"] and result["plugin_backend"] == backend
    assert ("int4 CPUWNA16LinearKernel" if backend == "int4" else "dense (as stock vLLM)") in result["plugin_kernels"]
    runs = result["throughput"]["runs"]["1"]
    for side in ("stock", "plugin"):
        assert runs[side]["decode_b16_tok_per_s"] > 0 and runs[side]["prefill_tok_per_s"] > 0
    assert result["greedy"]["prompts"] == 7 and result["greedy"]["plugin_equals_reference"] >= 5
    assert "plugin / stock" in (tmp_path / "gpu_check-cpu.md").read_text()


def test_llama_cpp_peer_measures_where_installed(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llama-cpp-python is not installed (bash scripts/setup-llama-cpp.sh)")
    out = tmp_path / "peer.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "llama_cpp_peer.py"), "--synthetic", "small",
                           "--checkpoints", str(tmp_path), "--repeats", "1", "--decode-tokens", "4",
                           "--prefill-tokens", "32", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    peers = json.loads(out.read_text())["peers"]
    for name in ("llama.cpp-f16", "llama.cpp-q8_0"):
        assert "error" not in peers[name], peers[name]
        assert peers[name]["decode_b1_tok_per_s"] > 0 and peers[name]["prefill_tok_per_s"] > 0
        assert "AVX2 = 1" in peers[name]["isa_paths"]["llama.cpp"]


def test_serve_bench_smoke(tmp_path):
    """benchmarks/serve_bench.py: `vllm serve` per side and `vllm bench serve` per concurrency, JSON from
    vLLM's own result files (tiny model, eager)."""
    out = tmp_path / "serve_bench.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "serve_bench.py"), "--smoke", "--out", str(out),
                           "--checkpoints", str(tmp_path / "checkpoints")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for side in ("stock", "plugin"):
        assert "error" not in result["sides"][side], result["sides"][side].get("error")
        for c in ("1", "4"):
            m = result["sides"][side]["by_concurrency"][c]
            assert "error" not in m, m.get("error")
            assert m["completed"] == 8 and m["failed"] == 0 and m["max_concurrency"] == int(c)
            assert m["output_throughput"] > 0 and 0 < m["p50_ttft_ms"] <= m["p99_ttft_ms"]
            assert m["p50_tpot_ms"] > 0 and m["p99_itl_ms"] > 0
            # the server's own count (/metrics): 8 requests of 8 tokens
            assert m["server_generated_tokens"] == m["expected_generated_tokens"] == 8 * 8 and m["full_length"]
    assert "bitcpm: packed" in result["sides"]["plugin"]["plugin_log"]
    assert result["sides"]["stock"]["plugin_log"] is None
    assert (tmp_path / "serve_bench" / "plugin-c4.json").exists() and out.with_suffix(".png").exists()


def _llama_server_missing() -> str | None:
    return _benchmark_module("llama_server").installed()


@pytest.mark.skipif(_llama_server_missing() is not None, reason=str(_llama_server_missing()))
def test_serve_bench_llama_server_peer(tmp_path):
    """serve_bench.py --peers llama-server: llama.cpp's server on the GGUF of the same checkpoint,
    driven by the same `vllm bench serve` command; every request generates its full length by the
    server's own count, and the plugin side beside it does too."""
    out = tmp_path / "serve_bench.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "serve_bench.py"), "--synthetic", "small",
                           "--checkpoints", str(tmp_path / "checkpoints"), "--sides", "plugin",
                           "--peers", "llama-server", "--llama-threads", "1", "--concurrency", "1", "4",
                           "--num-prompts", "8", "--input-len", "32", "--output-len", "8", "--eager",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["sides"]) == {"plugin", "llama-server-q8_0-t1"}
    peer = result["sides"]["llama-server-q8_0-t1"]
    assert "error" not in peer, peer.get("error")
    assert "--parallel 4" in peer["server_command"] and "--threads 1" in peer["server_command"]
    for side in result["sides"].values():
        for c in ("1", "4"):
            m = side["by_concurrency"][c]
            assert "error" not in m, m.get("error")
            assert m["completed"] == 8 and m["failed"] == 0, m
            assert m["server_generated_tokens"] == m["expected_generated_tokens"] == 64 and m["full_length"]
            assert m["output_throughput"] > 0 and m["p50_ttft_ms"] > 0
    assert result["llama_server_version"]
    assert "llama-server TQ2_0 + Q8_0 head, 1 thr" in out.with_suffix(".md").read_text()


def test_soak_short(tmp_path):
    """benchmarks/soak.py, short, every phase on the tiny model: 60 requests at concurrency 8, a fifth
    malformed (every kind at least once, logprobs/top_logprobs 21 among them), some clients hanging up
    mid-stream, every edge case once, a burst of 16 past a 1024-token KV cache, SIGTERM under load and
    a restart: nothing lost, every good one served in full, every bad one 4xx, a clean shutdown (in-flight
    requests drained within the 60 s shutdown timeout, every server process gone)."""
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "soak.py"), "--requests", "60", "--concurrency", "8",
                           "--bad-fraction", "0.2", "--burst-concurrency", "16", "--kv-cache-tokens", "1024",
                           "--extremes-per-kind", "1", "--synthetic", "tiny", "--checkpoints", str(tmp_path / "ck"),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert proc.returncode == 0, (summary["checks"], summary.get("failures"), proc.stderr[-3000:])
    soak = _benchmark_module("soak")
    assert all(summary["bad_status_by_kind"][kind] for kind in soak.BAD_KINDS)
    assert summary["bad_status_by_kind"]["logprobs_over_max"] == [400]
    assert summary["bad_status_by_kind"]["top_logprobs_over_max"] == [400]
    assert all(outcomes == ["completed"] for outcomes in summary["extreme_outcomes_by_kind"].values())
    assert summary["lost"] == 0 and summary["failed"] == 0 and summary["aborted_by_client"] > 0
    assert summary["rejected_4xx"] == summary["by_phase"]["mix"]["rejected_4xx"] > 0
    assert summary["streamed_served"] > 0 and summary["chat_served"] > 0
    assert summary["server_alive_at_end"] and summary["plugin_packed_the_model"] and summary["metrics_settled"]
    burst = summary["burst"]
    assert burst["exceeds_kv_cache"] and burst["completed"] == burst["requests"] == 16
    shutdown = summary["shutdown"]
    assert shutdown["in_flight_at_signal"]["loaded"] and shutdown["server_shutdown_timeout_s"] == 60
    in_shutdown = summary["by_phase"]["shutdown"]
    assert in_shutdown.get("completed", 0) + in_shutdown.get("cut_by_shutdown", 0) == 16
    assert shutdown["clean"] and not shutdown["leftover_pids"]
    assert shutdown["all_processes_exit_s"] <= shutdown["limit_s"]
    assert summary["by_phase"]["shutdown"].get("lost", 0) == 0 and summary["restart_served"]
    assert all(summary["checks"].values())


def test_big_shapes_smoke(tmp_path):
    """benchmarks/big_shapes.py end to end on the tiny shape: sharded source, measured streaming
    convert, stock and plugin engines, ceilings from a measured bandwidth."""
    out = tmp_path / "big_shapes.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "big_shapes.py"), "--smoke", "--threads", "1",
                           "--checkpoints", str(tmp_path / "checkpoints"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    (shape,) = result["shapes"]
    conversion = shape["conversion"]
    assert conversion["source_shards"] > 1 and conversion["packed_shards"] > 1
    assert 0 < conversion["packed_bytes"] < 0.4 * conversion["source_bytes"]
    assert conversion["peak_anon_bytes"] > 0 and conversion["vm_hwm_bytes"] >= conversion["peak_anon_bytes"]
    assert result["read_bandwidth_bytes_per_s"] > 1e9
    for side in ("stock", "plugin"):
        s = shape["sides"][side]
        assert "error" not in s, s.get("error")
        assert s["decode_b1_tok_per_s"] > 0 and s["prefill_tok_per_s"] > 0 and s["peak_rss_gib"] > 0
        assert s["decode_bytes_per_token"] > 0 and s["bandwidth_ceiling_tok_per_s"] > 0
    assert shape["sides"]["plugin"]["decode_bytes_per_token"] < shape["sides"]["stock"]["decode_bytes_per_token"]
    assert "Converter memory" in proc.stdout and "b1 / ceiling" in proc.stdout


def test_machine_names_carry_the_isa_class_the_kernels_see():
    """Benchmark titles name the CPU class (from /proc/cpuinfo flags), so an AVX2-only figure is
    never read as an AVX512 one."""
    engine_sides = _benchmark_module("engine_sides")
    base = {"cpu": "AMD EPYC", "cores": 2, "arch": "x86_64", "platform": "cpu", "vllm": "0.32.0", "torch": "2.13.0"}
    cases = {("avx2", "avx512f", "avx512_bf16"): "AVX512-BF16", ("avx2", "avx512f"): "AVX512",
             ("avx2", "fma"): "AVX2-only", ("sse4_2",): "no AVX2"}
    for flags, expected in cases.items():
        info = {**base, "isa": list(flags)}
        assert engine_sides.isa_class(info) == expected
        assert engine_sides.machine_name(info).startswith(f"AMD EPYC, 2 cores, {expected} (cpu;")
    assert engine_sides.isa_class({**base, "arch": "aarch64", "isa": ["asimd"]}) is None
    assert engine_sides.isa_class({**base, "isa": []}) is None
    assert engine_sides.machine_name({**base, "device": "NVIDIA H200"}).startswith("NVIDIA H200 (cpu;")
