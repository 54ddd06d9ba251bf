"""The full BitCPM4 report for one model and this machine: accuracy + throughput, stock vs ternary.

    .venv/bin/python benchmarks/report.py                                   # synthetic BitCPM4-0.5B shape
    .venv/bin/python benchmarks/report.py --model openbmb/BitCPM4-0.5B [--reference transformers]
    .venv/bin/python benchmarks/report.py --smoke                           # CI: tiny model, few tokens
    .venv/bin/python benchmarks/report.py --from-json benchmarks/results/report.json   # re-render only

Reproduces the measurements of the published BitCPM4-0.5B report (Ascend 910B2, vLLM dense bf16
vs CPU float32: 7 prompts, batch 10, single request, 252-token prefill, weight memory) for stock
vLLM, vLLM + bitcpm and vLLM + bitcpm int8 in one run. Each side is ONE engine in its own child
per thread count (benchmarks/engine_sides.py); the accuracy (benchmarks/accuracy.py) runs on the
first thread count's engines, the throughput (benchmarks/throughput.py) on all of them.

Writes to --results-dir (benchmarks/results, or benchmarks/results/smoke with --smoke):
report.json, report-accuracy.png, report-throughput.png, REPORT.md (also printed), and
README_results.md: the README's "Results" block, generated from the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy  # noqa: E402
import throughput  # noqa: E402
from engine_sides import (  # noqa: E402
    DEFAULT_SIDES, RESULTS_DIR, SIDE_LABELS, TRAINED_MODEL_SIDES, add_model_arguments, apply_isa_mode,
    available_threads, engine_settings, first_engine_info, flat_metrics, machine, machine_name, resolve_model,
    run_sides, write_json,
)

#: The published report's throughput figures (Ascend 910B2, vLLM dense bf16), by our metric keys.
PUBLISHED_THROUGHPUT = {
    "batch10_output": "298–336",
    "single_tok_per_s": "34.8",
    "prefill_tok_per_s": "~4273",
    "weight_gib": "0.82",
}

#: bitnet.cpp (I2_S, bf16/f16 embedding kept) on the BitCPM4-0.5B shape, llama-bench on the
#: project's reference machine (2 cores, brief of the CPU-kernel issue): threads -> tok/s.
BITNET_CPP_I2_S = {"tg128": {1: 50, 2: 81}, "pp256": {1: 114, 2: 223}}
#: The CPU-kernel issue's end-to-end targets, as (label, key, stock multiple, bitnet.cpp fraction).
CPU_TARGETS = [
    ("decode, batch 1 (tok/s)", "decode_b1_tok_per_s", 4.0, ("tg128", 0.8)),
    ("decode, batch 10 (tok/s)", "decode_b10_tok_per_s", 3.0, None),
    ("prefill, 252-token prompt (tok/s)", "prefill_tok_per_s", 1.0, ("pp256", 0.8)),
]
WEIGHT_TARGET_GIB = 0.30
#: The AVX2 issue's targets (one run, AVX2 machine or AVX2 mode, bf16): (metric key, label, side,
#: [(baseline side, multiple)]); a target is met when the side reaches every baseline x multiple.
AVX2_TARGETS = [
    ("decode_b1_tok_per_s", "decode, batch 1 (tok/s)", "plugin", [("llama.cpp-f16", 0.8)]),
    ("decode_b1_tok_per_s", "decode, batch 1 (tok/s)", "plugin-int8", [("llama.cpp-f16", 1.0)]),
    ("prefill_tok_per_s", "prefill, 252-token prompt (tok/s)", "plugin", [("stock-fp32", 1.0)]),
    ("prefill_tok_per_s", "prefill, 252-token prompt (tok/s)", "plugin-int8", [("llama.cpp-f16", 1.0)]),
    ("decode_b10_tok_per_s", "decode, batch 10 (tok/s)", "plugin", [("stock", 4.0), ("stock-fp32", 1.0)]),
    ("decode_b10_tok_per_s", "decode, batch 10 (tok/s)", "plugin-int8", [("stock", 4.0), ("stock-fp32", 1.0)]),
]
#: Peer metrics compared side by side with the vLLM sides (what llama_cpp_peer.py measures).
PEER_METRICS = [("decode_b1_tok_per_s", "decode, batch 1 (tok/s)", "{:.1f}"),
                ("prefill_tok_per_s", "prefill, 252-token prompt (tok/s)", "{:.0f}"),
                ("weight_gib", "weights, all incl. embedding (GiB)", "{:.3f}")]

#: Settings of --smoke: the tiny synthetic model, a few tokens, one repeat, one thread.
SMOKE = {"synthetic": "tiny", "batch_max_tokens": [4], "single_max_tokens": 4, "decode_tokens": 4,
         "repeats": 1, "kv_cache_gib": 1 / 16, "threads": [1], "parallel_sides": True, "llama_cpp": "no"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    accuracy.add_arguments(parser)
    throughput.add_arguments(parser)
    parser.add_argument("--threads", type=int, nargs="+", default=[available_threads()],
                        help="model thread counts (one engine per side each; accuracy on the first)")
    parser.add_argument("--parallel-sides", action="store_true",
                        help="start the sides' engines together (CI: faster, but timings become meaningless)")
    parser.add_argument("--smoke", action="store_true", help="CI mode: " + json.dumps(SMOKE))
    parser.add_argument("--results-dir", help="default benchmarks/results (benchmarks/results/smoke with --smoke)")
    parser.add_argument("--from-json", help="only re-render the Markdown and plots from a report.json")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if key == "synthetic" and args.model:
                continue
            setattr(args, key, value)
    if args.isa == "avx2" and args.sides == DEFAULT_SIDES:
        args.sides = [*DEFAULT_SIDES, "stock-fp32"]  # the AVX2 targets' prefill and batch-10 baseline
    trained = bool(args.model) and accuracy.is_trained_model(args.model)
    if trained and args.sides == DEFAULT_SIDES:
        args.sides = list(TRAINED_MODEL_SIDES)  # judge each option on its own
    if args.results_dir is None:
        args.results_dir = str(RESULTS_DIR / ("smoke" if args.smoke else "trained" if trained else ""))
    return args


def run(args) -> dict:
    """Reference first, then one engine per side and thread count; the combined report JSON."""
    from tqdm import tqdm

    model = resolve_model(args)
    settings = engine_settings(args)
    accuracy_settings = engine_settings(args, full_vocab_logprobs=True)
    inputs = accuracy.prepare(args, model, settings["max_model_len"])
    ref_logits, ref_nll = accuracy.reference_for(args, model, inputs, settings["max_model_len"])
    spec = throughput.measure_spec(args, throughput.model_vocab(model))
    runs = {}
    with tqdm(total=(len(args.threads) + 1) * len(args.sides), unit="engine", desc="engines") as bar:
        # Accuracy on its own engines (max_logprobs=-1), throughput on engines configured as users run them.
        accuracy_sides = run_sides(model, accuracy_settings, {"accuracy": inputs.engine_spec()}, args.sides,
                                   args.threads[0], progress=bar, parallel=args.parallel_sides)
        for threads in args.threads:
            sides = run_sides(model, settings, {"throughput": spec}, args.sides, threads, progress=bar,
                              parallel=args.parallel_sides)
            runs[str(threads)] = {side: flat_metrics(r) for side, r in sides.items()}
            runs[str(threads)].update(throughput.run_peers(args, model, spec, threads))
    info = machine(first_engine_info(accuracy_sides))
    return {
        "kind": "bitcpm-report",
        "model": model,
        "synthetic": None if args.model else args.synthetic or "bitcpm4-0.5b",
        "smoke": args.smoke,
        "parallel_sides": args.parallel_sides,
        "command": " ".join(["python", "benchmarks/report.py", *sys.argv[1:]]),
        "accuracy": accuracy.assemble(model, accuracy_settings, args, inputs, ref_logits, accuracy_sides, info,
                                      ref_nll),
        "throughput": throughput.assemble(model, settings, spec, runs, info, args.isa),
    }


# --------------------------------------------------------------------------------------------
# Rendering (from the JSON alone, so --from-json re-renders without engines)


def _model_line(report: dict) -> str:
    name = Path(report["model"]).name
    if (report.get("accuracy") or {}).get("training"):
        return (f"`{name}`, a small MiniCPM trained here with BitCPM-style ternary QAT "
                "(`python -m vllm_bitcpm.testing.qat_training`): peaked next-token distributions like the real "
                "releases', but far smaller, so its throughput says little about BitCPM4-0.5B")
    if report.get("synthetic"):
        return (f"synthetic checkpoint of the `{report['synthetic']}` shape (`{name}`; random ternary weights: "
                "accuracy figures measure numerical agreement with the reference, not model quality)")
    return f"`{report['model']}`"


def headline_table(report: dict) -> str:
    """The published report's throughput and memory rows: each side, its ratio to stock, published."""
    tp = report["throughput"]
    threads = max(tp["runs"], key=int)
    runs = tp["runs"][threads]
    sides = [s for s in runs if "error" not in runs[s]]
    labels = {k: label for k, label, _ in throughput.metric_rows(tp["spec"])}
    formats = {k: fmt for k, _, fmt in throughput.metric_rows(tp["spec"])}
    b = tp["spec"]["batch"]
    keys = [f"batch{b}_mt{n}_output_tok_per_s" for n in tp["spec"]["batch_max_tokens"]]
    keys += ["single_tok_per_s", "prefill_tok_per_s", "long_prompt_decode_ms_per_token", "weight_gib",
             "kv_cache_tokens", "max_concurrency", "init_seconds"]
    header = ["metric"]
    for side in sides:
        header += [SIDE_LABELS[side]] + (["vs stock"] if side != "stock" and "stock" in sides else [])
    header.append("published (Ascend 910B2, stock bf16)")
    lines = [f"{threads} model thread(s), engine {tp['settings']['dtype']}:", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        if not any(runs[s].get(key) is not None for s in sides):
            continue
        cells = [labels[key]]
        for side in sides:
            value = runs[side].get(key)
            cells.append("-" if value is None else formats[key].format(value))
            if side != "stock" and "stock" in sides:
                base = runs["stock"].get(key)
                cells.append(f"{value / base:.2f}x" if value is not None and base else "-")
        published_key = "batch10_output" if key.startswith(f"batch{b}_") else key
        cells.append(PUBLISHED_THROUGHPUT.get(published_key, "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(report: dict) -> str:
    """The CPU-kernel issue's targets per thread count: stock, bitcpm, ratio, bitnet.cpp, met?"""
    tp = report["throughput"]
    lines = ["| threads | metric | stock vLLM | vLLM + bitcpm | vs stock | vLLM + bitcpm int8 | vs stock "
             "| bitnet.cpp I2_S | target | met (bitcpm / int8) |", "|" + "---|" * 10]
    for threads in sorted(tp["runs"], key=int):
        runs = tp["runs"][threads]
        if any("error" in runs.get(side, {"error": 1}) for side in ("stock", "plugin")):
            continue
        t = int(threads)
        for label, key, multiple, peer in CPU_TARGETS:
            stock = runs["stock"].get(key)
            values = [runs[side].get(key) if "error" not in runs.get(side, {"error": 1}) else None
                      for side in ("plugin", "plugin-int8")]
            peer_value = BITNET_CPP_I2_S[peer[0]].get(t) if peer else None
            need = max(x for x in (stock * multiple if stock else None,
                                   peer_value * peer[1] if peer_value else None) if x is not None)
            target = " and ".join(
                [f"≥ {multiple:g}x stock"] + ([f"≥ {peer[1]:g}x bitnet.cpp"] if peer_value else []))
            cells = [str(t), label, f"{stock:.1f}"]
            for v in values:
                cells += ["-", "-"] if v is None else [f"{v:.1f}", f"{v / stock:.2f}x"]
            cells += [str(peer_value or "-"), f"{target} (≥ {need:.0f})",
                      " / ".join("-" if v is None else ("yes" if v >= need else "no") for v in values)]
            lines.append("| " + " | ".join(cells) + " |")
        weights = runs["plugin"].get("weight_gib")
        lines.append(f"| {t} | weights, all incl. bf16 embedding (GiB) | {runs['stock'].get('weight_gib', 0):.3f} | "
                     f"{weights:.3f} | {weights / runs['stock']['weight_gib']:.2f}x | - | - | - | "
                     f"≤ {WEIGHT_TARGET_GIB} | {'yes' if weights <= WEIGHT_TARGET_GIB else 'no'} |")
    return "\n".join(lines)


def _measured(runs: dict, side: str, key: str):
    metrics = runs.get(side, {})
    return None if "error" in metrics else metrics.get(key)


def peer_table(report: dict) -> str:
    """Each vLLM side next to llama.cpp TQ2_0 measured in the same run, per thread count ('' if none ran)."""
    tp = report["throughput"]
    peers = [p for p in ("llama.cpp-f16", "llama.cpp-q8_0")
             if any(_measured(runs, p, "decode_b1_tok_per_s") for runs in tp["runs"].values())]
    if not peers:
        return ""
    lines = ["| threads | metric | side | value | " + " | ".join(f"vs {SIDE_LABELS[p]}" for p in peers) + " |",
             "|" + "---|" * (4 + len(peers))]
    for threads in sorted(tp["runs"], key=int):
        runs = tp["runs"][threads]
        for key, label, fmt in PEER_METRICS:
            for side in [s for s in runs if _measured(runs, s, key) is not None]:
                value = _measured(runs, side, key)
                ratios = [f"{value / base:.2f}x" if (base := _measured(runs, p, key)) else "-" for p in peers]
                lines.append(f"| {threads} | {label} | {SIDE_LABELS.get(side, side)} | {fmt.format(value)} | "
                             + " | ".join(ratios) + " |")
    return "\n".join(lines)


def avx2_targets_table(report: dict) -> str:
    """The AVX2 issue's targets, judged on sides measured in this run; '-' where a baseline did not run."""
    tp = report["throughput"]
    lines = ["| threads | metric | side | value | target | needed | met |", "|" + "---|" * 7]
    for threads in sorted(tp["runs"], key=int):
        runs = tp["runs"][threads]
        for key, label, side, baselines in AVX2_TARGETS:
            value = _measured(runs, side, key)
            bases = [(_measured(runs, b, key), b, m) for b, m in baselines]
            target = " and ".join(f"≥ {m:g}x {SIDE_LABELS[b]} ({'-' if v is None else f'{v:.1f}'})"
                                  for v, b, m in bases)
            known = [v * m for v, _, m in bases if v is not None]
            need = max(known) if len(known) == len(bases) else None
            met = "-" if value is None or need is None else ("yes" if value >= need else "no")
            lines.append(f"| {threads} | {label} | {SIDE_LABELS[side]} | {'-' if value is None else f'{value:.1f}'} | "
                         f"{target} | {'-' if need is None else f'{need:.1f}'} | {met} |")
    return "\n".join(lines)


def _comparison_sections(report: dict) -> list[str]:
    """Markdown parts: the AVX2 targets (AVX2-mode runs) or the CPU-kernel targets, and the llama.cpp peer."""
    if _trained(report):
        parts = ["The CPU and AVX2 targets are set for the BitCPM4-0.5B shape (bitnet.cpp's figures are for it); "
                 "this tiny trained model is for accuracy, so they are not shown.", ""]
    elif report["throughput"].get("isa_mode") == "avx2":
        parts = ["## AVX2 targets (sides and llama.cpp measured in this run)", "", avx2_targets_table(report), ""]
    else:
        parts = ["## CPU targets (decode-only rates; bitnet.cpp figures from the kernel issue)", "",
                 targets_table(report), ""]
    peers = peer_table(report)
    if peers:
        parts += ["## Against llama.cpp TQ2_0 (same checkpoint, CPUs and run)", "", peers, ""]
    else:
        why = {r["error"] for runs in report["throughput"]["runs"].values() for s, r in runs.items()
               if s.startswith("llama.cpp") and "error" in r}
        parts += [f"llama.cpp peer not measured: {'; '.join(sorted(why)) or 'disabled (--llama-cpp no)'}", ""]
    return parts


def _trained(report: dict) -> bool:
    """A model trained by vllm_bitcpm.testing.qat_training (its accuracy section carries the record)."""
    return bool((report.get("accuracy") or {}).get("training"))


def _ran(report: dict, side: str) -> bool:
    return any(side in runs and "error" not in runs[side] for runs in report["throughput"]["runs"].values())


def _peer_lines(report: dict) -> list[str]:
    """Which llama.cpp ran: its python binding, library folder and the CPU features it was built with."""
    for runs in report["throughput"]["runs"].values():
        peer = runs.get("llama.cpp-f16", {})
        if "error" not in peer and peer:
            return [f"- Peer: llama.cpp through llama-cpp-python {peer.get('llama_cpp_python')} "
                    f"(`{peer.get('library')}`), the same checkpoint as GGUF (TQ2_0 linears, lossless; F16 or Q8_0 "
                    f"head), pinned to the same CPU; built for: `{peer.get('isa_paths', {}).get('llama.cpp', '?')}`"]
    return []


def _setup_lines(report: dict) -> list[str]:
    tp, acc = report["throughput"], report["accuracy"]
    info, settings = tp["machine"], tp["settings"]
    kv = (f"KV cache {settings['kv_cache_memory_bytes'] / 2**30:.3g} GiB (explicit, same for every side)"
          if "kv_cache_memory_bytes" in settings else
          f"KV cache sized by vLLM from gpu_memory_utilization={settings['gpu_memory_utilization']}")
    return [
        f"- Machine: {machine_name(info)}; ISA {', '.join(info.get('isa', [])) or '-'}; host `{info.get('host', '?')}`",
        f"- Model: {_model_line(report)}",
        f"- Engine: dtype {settings['dtype']}, {engine_mode(settings)}, "
        f"in-process, prefix caching off, max_model_len {settings['max_model_len']}, {kv}",
        f"- Threads: {tp['threads_bind']}",
        f"- Accuracy reference: {acc['reference']['kind']} {acc['reference']['dtype']} on CPU; "
        f"{accuracy.prompts_description(acc)}; full-vocabulary log-probs from vLLM",
        "- Sides: stock vLLM (plugin disabled); vLLM + bitcpm (default: exact activations, bf16 head); "
        + ("vLLM + bitcpm int8 activations (`VLLM_BITCPM_ACTIVATIONS=int8`); vLLM + bitcpm int8 head "
           "(`VLLM_BITCPM_LM_HEAD=int8`); " if _ran(report, "plugin-int8-act") else "")
        + "vLLM + bitcpm int8 (`VLLM_BITCPM_ACTIVATIONS=int8 VLLM_BITCPM_LM_HEAD=int8`)"
        + ("; stock vLLM float32 (plugin disabled, `dtype=float32`)" if _ran(report, "stock-fp32") else ""),
        *_peer_lines(report),
        *([f"- **AVX2 mode** (`--isa avx2`, vllm_bitcpm/testing/isa_mode.py): every side on its AVX2 paths on this "
           f"AVX512 CPU; each side's `isa_paths` in report.json"] if tp.get("isa_mode") == "avx2" else []),
        f"- Run: `{report['command']}` at {tp['time']}, {tp['spec']['repeats']} repeat(s), medians",
        *(["- **Sides ran in parallel (--parallel-sides / --smoke): the timings are not comparable.**"]
          if report.get("parallel_sides") else []),
    ]


def report_markdown(report: dict) -> str:
    """REPORT.md: setup, accuracy summary and per-prompt tables, headline and full throughput tables."""
    acc, tp = report["accuracy"], report["throughput"]
    parts = [f"# BitCPM4 report: {Path(report['model']).name}, stock vLLM vs ternary", "", *_setup_lines(report), "",
             "## Accuracy: next token vs float reference", "", accuracy.markdown(acc), "",
             "## Throughput and memory", "", headline_table(report), "",
             *_comparison_sections(report),
             "### All measurements", "", throughput.markdown_tables(tp), "",
             "Plots: `report-accuracy.png`, `report-throughput.png`."]
    return "\n".join(parts) + "\n"


def engine_mode(settings: dict) -> str:
    """How the engine ran the model: vLLM's default (torch.compile) or eager (``enforce_eager``)."""
    return "eager (`enforce_eager=True`)" if settings["enforce_eager"] else "torch.compile (vLLM's default)"


def readme_block(report: dict) -> str:
    """The README's "Results" section: summary tables only, the machine named, generated from JSON."""
    acc, tp = report["accuracy"], report["throughput"]
    threads = max(tp["runs"], key=int)
    info = tp["machine"]
    base = "benchmarks/results/trained" if _trained(report) else "benchmarks/results"
    parts = [
        "## Results", "",
        f"Measured with `benchmarks/report.py` on {machine_name(info)}, {threads} model thread(s), "
        f"engine dtype {tp['settings']['dtype']}, {engine_mode(tp['settings'])}, {tp['time'][:10]}. "
        f"Model: {_model_line(report)}. "
        "Stock vLLM and vLLM + bitcpm ran the same token ids in the same invocation; full tables in "
        f"`{base}/REPORT.md`, data in `{base}/report.json`. The published column is "
        "the BitCPM4-0.5B report's stock vLLM on Ascend 910B2: other hardware, shown for scale only.", "",
        f"**Next-token accuracy** ({accuracy.prompts_description(acc)}, vs "
        f"{acc['reference']['kind']} {acc['reference']['dtype']} on CPU):", "",
        accuracy.summary_markdown(acc), "",
        "**Throughput and memory:**", "",
        headline_table(report), "",
        *([] if _trained(report) else
          ["**AVX2 targets** (AVX2 mode; every baseline measured in this run; decode-only tok/s = "
            "(time for N tokens − time for 1) / (N − 1)):", "", avx2_targets_table(report), ""]
          if tp.get("isa_mode") == "avx2" else
          ["**CPU targets** (decode-only tok/s = (time for N tokens − time for 1) / (N − 1); bitnet.cpp "
           "I2_S llama-bench tg128 / pp256 on the same shape, as measured on the project's reference "
           "machine; int8 = `bitcpm int8`):", "", targets_table(report), ""]),
        *(["**Against llama.cpp TQ2_0** (`benchmarks/llama_cpp_peer.py`: the same checkpoint as GGUF, the "
           "same CPUs, in the same run):", "", peers, ""] if (peers := peer_table(report)) else []),
        f"![accuracy]({base}/report-accuracy.png)",
        f"![throughput]({base}/report-throughput.png)", "",
        "Reproduce: `" + report["command"] + "`",
        *(["", "**Smoke run: tiny model, sides in parallel; not a measurement.**"] if report.get("smoke") else []),
    ]
    return "\n".join(parts) + "\n"


def write_outputs(report: dict, results_dir: Path) -> list[Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json(results_dir / "report.json", report, ensure_ascii=False)]
    for name, text in (("REPORT.md", report_markdown(report)), ("README_results.md", readme_block(report))):
        (results_dir / name).write_text(text)
        written.append(results_dir / name)
    if accuracy.plot(report["accuracy"], results_dir / "report-accuracy.png"):
        written.append(results_dir / "report-accuracy.png")
    if throughput.plot(report["throughput"], results_dir / "report-throughput.png"):
        written.append(results_dir / "report-throughput.png")
    return written


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.from_json:
        apply_isa_mode(args)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
    else:
        report = run(args)
    written = write_outputs(report, Path(args.results_dir))
    print()
    print(report_markdown(report))
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
