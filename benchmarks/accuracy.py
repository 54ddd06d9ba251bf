"""Next-token accuracy on the published report's 7 prompts: stock vLLM and the ternary path vs float32.

    .venv/bin/python benchmarks/accuracy.py                          # synthetic BitCPM4-0.5B shape
    .venv/bin/python benchmarks/accuracy.py --model PATH_OR_HUB_ID [--dtype float32]
    .venv/bin/python benchmarks/accuracy.py --model openbmb/BitCPM4-0.5B --reference transformers

Candidates, each one engine in its own child (benchmarks/engine_sides.py): stock vLLM, vLLM +
bitcpm (default: exact activations, bf16 head) and vLLM + bitcpm with int8 activations and int8
head. Each returns the full-vocabulary log-probs of the next token (LLM(max_logprobs=-1),
SamplingParams(logprobs=-1, max_tokens=1)), compared with a CPU float32 reference:

* ``minicpm`` (default): the project's independent MiniCPM forward (vllm_bitcpm.reference_model);
* ``transformers``: AutoModelForCausalLM in float32 with the model's remote code, as the
  published report did (needs a real hub model whose modelling code transformers can load).

Prints the report's per-prompt table and summary (vllm_bitcpm.accuracy metrics, plus full-vocab
KL divergence), writes JSON and a PNG plot to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_sides import (  # noqa: E402
    RESULTS_DIR, SIDE_LABELS, add_model_arguments, apply_isa_mode, available_threads, engine_settings, first_engine_info, machine,
    machine_name, resolve_model, run_sides,
)

#: The published BitCPM4-0.5B report: vLLM dense bf16 on Ascend 910B2 vs CPU float32, 7 prompts.
PUBLISHED_ACCURACY = {
    "platform": "Ascend 910B2, vLLM dense bf16 vs CPU float32 (published report)",
    "top1_match_rate": 1.0,
    "mean_top10_overlap": 10.0,
    "mean_top1_prob_rel_error": 0.0084,
}
REFERENCES = ("minicpm", "transformers")
TOP_K = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accuracy")
    group.add_argument("--reference", default="minicpm", choices=REFERENCES,
                       help="float32 oracle: the project's MiniCPM forward, or transformers + remote code")
    group.add_argument("--reference-dtype", default="float32", choices=["float32", "float64"])
    group.add_argument("--prompt", action="append", dest="prompts",
                       help="replace the report's 7 prompts (repeatable)")


# --------------------------------------------------------------------------------------------
# Child side: runs inside the engine process started by engine_sides


def measure_engine(llm, spec: dict, scratch: str) -> dict:
    """Full-vocabulary next-token log-probs per prompt, saved as a (prompts, vocab) float32 tensor."""
    import torch
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, use_tqdm=False)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    logprobs = torch.full((len(outputs), vocab), -math.inf, dtype=torch.float32)
    returned = []
    for row, out in enumerate(outputs):
        step = out.outputs[0].logprobs[0]
        returned.append(len(step))
        ids = torch.tensor(list(step.keys()), dtype=torch.long)
        logprobs[row, ids] = torch.tensor([lp.logprob for lp in step.values()], dtype=torch.float32)
    path = str(Path(scratch) / "logprobs.pt")
    torch.save(logprobs, path)
    return {"logprobs_file": path, "vocab": vocab, "logprobs_returned": returned}


# --------------------------------------------------------------------------------------------
# Parent side: tokenizer, reference, comparison


def load_tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from vllm_bitcpm.config import register_config

    register_config()  # AutoTokenizer reads config.json; transformers lacks model_type "minicpm"
    return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)


def _local_checkpoint(model: str) -> Path:
    """A directory with config.json and safetensors: ``model`` itself, or its hub snapshot."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.py", "*.model"]))


def reference_logits(model: str, prompt_ids: list[list[int]], kind: str, dtype_name: str,
                     max_model_len: int, trust_remote_code: bool) -> list:
    """Next-token logits of the float reference for every prompt (vocab,)."""
    import torch
    from tqdm import tqdm

    dtype = getattr(torch, dtype_name)
    if kind == "minicpm":
        from vllm_bitcpm.reference_model import ReferenceMiniCPM

        path = _local_checkpoint(model)
        config = json.loads((path / "config.json").read_text())
        scaling = config.get("rope_scaling") or {}
        original = scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings")
        # vLLM picks LongRoPE's factor set per engine, from max_model_len (reference_model docstring).
        reference = ReferenceMiniCPM.from_pretrained(
            path, dtype=dtype, use_long_factors=bool(original) and max_model_len > original)
        forward = reference.next_token_logits
    else:
        try:
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(
                model, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        except Exception as err:  # noqa: BLE001 - the user needs the reason, not a traceback
            raise SystemExit(
                f"--reference transformers: cannot load {model!r} with transformers "
                f"AutoModelForCausalLM (float32, trust_remote_code={trust_remote_code}): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
                "It needs a real checkpoint that ships its modelling code (e.g. openbmb/BitCPM4-0.5B) "
                "and a transformers version that code supports; use --reference minicpm (the default) "
                "otherwise.") from err

        def forward(ids):
            with torch.no_grad():
                return hf_model(torch.tensor([ids])).logits[0, -1]

    return [forward(ids).to(torch.float64) for ids in tqdm(prompt_ids, desc=f"{kind} reference", unit="prompt")]


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def compare_side(side_result: dict, ref_logits: list, prompts: list[str], tokenizer) -> dict:
    """Per-prompt comparisons and the summary of one candidate against the reference."""
    import torch

    from vllm_bitcpm.accuracy import bar_failures, compare_next_token, summarize

    if "error" in side_result:
        return {"error": side_result["error"]}
    logprobs = side_result["accuracy"]["logprobs"].to(torch.float64)
    comparisons, rows = [], []
    for i, (prompt, ref) in enumerate(zip(prompts, ref_logits)):
        cand = logprobs[i]
        if cand.numel() > ref.numel():  # vLLM may pad the vocabulary; padded entries carry -inf
            cand = cand[: ref.numel()]
        c = compare_next_token(ref, cand)
        comparisons.append(c)
        top = torch.topk(cand, TOP_K)
        rows.append({
            "prompt": prompt,
            "ref_top1_id": c.ref_top1, "ref_top1_token": _token(tokenizer, c.ref_top1),
            "ref_top1_prob": c.ref_top1_prob,
            "cand_top1_id": c.cand_top1, "cand_top1_token": _token(tokenizer, c.cand_top1),
            "cand_top1_prob": float(cand[c.cand_top1].exp()),
            "cand_prob_of_ref_top1": float(cand[c.ref_top1].exp()),
            "top1_match": c.top1_match, "top5_inclusion": c.top5_inclusion, "top10_overlap": c.top10_overlap,
            "top1_prob_rel_error": c.top1_prob_rel_error, "top10_prob_mae": c.top10_prob_mae,
            "max_abs_error": c.max_abs_error, "rmse": c.rmse, "kl": c.kl,
            "top10": [[int(t), _token(tokenizer, int(t)), float(v.exp())] for v, t in zip(top.values, top.indices)],
        })
    summary = summarize(comparisons)
    return {"summary": summary, "bar_failures": bar_failures(summary), "per_prompt": rows,
            "logprobs_returned": side_result["accuracy"]["logprobs_returned"],
            "init_seconds": side_result.get("init_seconds")}


def reference_top10(ref_logits: list, tokenizer) -> list[list]:
    import torch

    out = []
    for ref in ref_logits:
        probs = torch.softmax(ref, dim=-1)
        top = torch.topk(probs, TOP_K)
        out.append([[int(t), _token(tokenizer, int(t)), float(p)] for p, t in zip(top.values, top.indices)])
    return out


def assemble(model: str, settings: dict, args, prompts, prompt_ids, ref_logits, sides: dict, tokenizer,
             info: dict) -> dict:
    """The accuracy JSON: inputs, reference, and per candidate its summary and per-prompt rows."""
    return {
        "model": model, "settings": settings, "machine": info, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "reference": {"kind": args.reference, "dtype": args.reference_dtype,
                      "top10": reference_top10(ref_logits, tokenizer)},
        "prompts": prompts, "prompt_ids": prompt_ids,
        "published": PUBLISHED_ACCURACY,
        "candidates": {side: compare_side(result, ref_logits, prompts, tokenizer) for side, result in sides.items()},
    }


# --------------------------------------------------------------------------------------------
# Report: tables and plot


def _md(text: str) -> str:
    """A token or prompt safe inside a Markdown table cell."""
    return "`" + text.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`"


def side_dtype(side: str, settings: dict) -> str:
    """The engine dtype a side ran: the *-fp32 sides override the run's (engine_sides.SIDES)."""
    from engine_sides import SIDES

    overrides = next((o for name, _, _, o in SIDES if name == side), {})
    return overrides.get("dtype", settings["dtype"])


def per_prompt_table(result: dict, side: str) -> str:
    rows = result["candidates"][side]["per_prompt"]
    lines = [f"**{SIDE_LABELS[side]}** vs {result['reference']['kind']} {result['reference']['dtype']} reference "
             f"(engine {side_dtype(side, result['settings'])})", "",
             "| # | prompt | reference top-1 (p) | candidate top-1 (p) | rel. error | top-10 overlap | KL (nats) |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        mark = "" if r["top1_match"] else " ✗"
        kl = "-" if r["kl"] is None else f"{r['kl']:.2e}"
        lines.append(f"| {i} | {_md(r['prompt'])} | {_md(r['ref_top1_token'])} ({r['ref_top1_prob']:.4f}) "
                     f"| {_md(r['cand_top1_token'])} ({r['cand_top1_prob']:.4f}){mark} "
                     f"| {_pct(r['top1_prob_rel_error'])} | {r['top10_overlap']}/10 | {kl} |")
    return "\n".join(lines)


SUMMARY_ROWS = [
    ("top1_match_rate", "top-1 match", lambda s: f"{round(s['top1_match_rate'] * s['num_prompts'])}/{s['num_prompts']}"),
    ("top5_inclusion_rate", "top-5 inclusion", lambda s: f"{round(s['top5_inclusion_rate'] * s['num_prompts'])}/{s['num_prompts']}"),
    ("mean_top10_overlap", "mean top-10 overlap", lambda s: f"{s['mean_top10_overlap']:.2f}/10"),
    ("mean_top1_prob_rel_error", "mean top-1 prob. rel. error", lambda s: _pct(s["mean_top1_prob_rel_error"])),
    ("max_top1_prob_rel_error", "max top-1 prob. rel. error", lambda s: _pct(s["max_top1_prob_rel_error"])),
    ("mean_top10_prob_mae", "top-10 prob. MAE", lambda s: f"{s['mean_top10_prob_mae']:.2e}"),
    ("max_abs_error", "max abs. prob. error (full vocab)", lambda s: _sci(s["max_abs_error"])),
    ("mean_rmse", "RMSE (full vocab)", lambda s: _sci(s["mean_rmse"])),
    ("mean_kl", "mean KL(ref ‖ cand) (nats)", lambda s: _sci(s["mean_kl"])),
    ("max_kl", "max KL (nats)", lambda s: _sci(s["max_kl"])),
]


def _sci(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def _pct(value: float) -> str:
    """A percentage, in scientific notation where two decimals would read 0.00%."""
    return f"{value:.2%}" if value >= 5e-5 or value == 0 else f"{value * 100:.1e}%"


def _published_cell(key: str, published: dict, num_prompts: int) -> str:
    if key not in published:
        return "-"
    if key == "top1_match_rate":
        return "7/7"
    if key == "mean_top10_overlap":
        return "10/10"
    return f"{published[key]:.2%}"


def summary_table(result: dict, with_published: bool = True) -> str:
    sides = [s for s, c in result["candidates"].items() if "error" not in c]
    header = ["metric"] + [SIDE_LABELS[s] for s in sides]
    if with_published:
        header.append("published (Ascend 910B2, stock bf16)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, fmt in SUMMARY_ROWS:
        cells = [label] + [fmt(result["candidates"][s]["summary"]) for s in sides]
        if with_published:
            cells.append(_published_cell(key, result["published"], 7))
        lines.append("| " + " | ".join(cells) + " |")
    bar = ["meets the project's bar"] + ["yes" if not result["candidates"][s]["bar_failures"] else
                                         "no: " + "; ".join(result["candidates"][s]["bar_failures"]) for s in sides]
    if with_published:
        bar.append("yes")
    lines.append("| " + " | ".join(bar) + " |")
    for side, c in result["candidates"].items():
        if "error" in c:
            lines.append(f"\n{SIDE_LABELS[side]} failed: {c['error']}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    parts = [summary_table(result), ""]
    for side, c in result["candidates"].items():
        if "error" not in c:
            parts += [per_prompt_table(result, side), ""]
    return "\n".join(parts)


def plot(result: dict, path: Path) -> bool:
    """Per-prompt top-1 probability relative error and KL, one bar per candidate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sides = [s for s, c in result["candidates"].items() if "error" not in c]
    n = len(result["prompts"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    width = 0.8 / max(len(sides), 1)
    for ax, key, scale, title in ((axes[0], "top1_prob_rel_error", 100, "top-1 probability relative error (%)"),
                                  (axes[1], "kl", 1, "KL(reference ‖ candidate), nats")):
        for i, side in enumerate(sides):
            xs = [j + (i - (len(sides) - 1) / 2) * width for j in range(n)]
            values = [(r[key] or 0) * scale for r in result["candidates"][side]["per_prompt"]]
            ax.bar(xs, values, width, label=SIDE_LABELS[side])
        ax.set_xticks(range(n), [p if len(p) <= 18 else p[:16] + "…" for p in result["prompts"]],
                      rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="1% bar (mean)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{Path(result['model']).name}, engine {result['settings']['dtype']} vs "
                 f"{result['reference']['kind']} {result['reference']['dtype']}: {machine_name(result['machine'])}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def prepare(args, model: str) -> tuple[list[str], list[list[int]], object]:
    """Prompts, their token ids (identical for every side and the reference) and the tokenizer."""
    from vllm_bitcpm.synthetic import REPORT_PROMPTS

    prompts = args.prompts or list(REPORT_PROMPTS)
    tokenizer = load_tokenizer(model, args.trust_remote_code)
    return prompts, [tokenizer(p).input_ids for p in prompts], tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=available_threads(), help="model threads per engine")
    parser.add_argument("--out", default=str(RESULTS_DIR / "accuracy.json"))
    args = parser.parse_args()
    apply_isa_mode(args)

    from tqdm import tqdm

    model = resolve_model(args)
    settings = engine_settings(args, full_vocab_logprobs=True)
    prompts, prompt_ids, tokenizer = prepare(args, model)
    ref_logits = reference_logits(model, prompt_ids, args.reference, args.reference_dtype,
                                  settings["max_model_len"], args.trust_remote_code)
    with tqdm(total=len(args.sides), unit="engine") as bar:
        sides = run_sides(model, settings, {"accuracy": {"prompts": prompt_ids}}, args.sides, args.threads, bar)
    result = assemble(model, settings, args, prompts, prompt_ids, ref_logits, sides, tokenizer,
                      machine(first_engine_info(sides)))
    print(f"\n### Accuracy: {Path(model).name}, engine {args.dtype}, vs {args.reference} {args.reference_dtype}\n")
    print(markdown(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
    if plot(result, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
