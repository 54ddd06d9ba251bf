"""Next-token accuracy on the published report's 7 prompts: stock vLLM and the ternary path vs float32.

    .venv/bin/python benchmarks/accuracy.py                          # synthetic BitCPM4-0.5B shape
    .venv/bin/python benchmarks/accuracy.py --model PATH_OR_HUB_ID [--dtype float32]
    .venv/bin/python benchmarks/accuracy.py --model openbmb/BitCPM4-0.5B --reference transformers

Candidates, each one engine in its own child (benchmarks/engine_sides.py): stock vLLM, vLLM +
bitcpm (default: exact activations, bf16 head) and vLLM + bitcpm with int8 activations and int8
head. Each returns the full-vocabulary log-probs of the next token (LLM(max_logprobs=-1),
SamplingParams(logprobs=-1, max_tokens=1)), compared with a CPU float32 reference:

* ``minicpm`` (default): the project's independent MiniCPM forward (vllm_bitcpm.testing.reference_model);
* ``transformers``: AutoModelForCausalLM in float32 with the model's remote code, as the
  published report did (needs a real hub model whose modelling code transformers can load).

Prints the report's per-prompt table and summary (vllm_bitcpm.testing.accuracy metrics, plus full-vocab
KL divergence), writes JSON and a PNG plot to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vllm_bitcpm.testing.accuracy import bar_failures  # noqa: E402
from engine_sides import (  # noqa: E402
    DEFAULT_SIDES, RESULTS_DIR, SIDE_LABELS, TRAINED_MODEL_SIDES, add_model_arguments, apply_isa_mode,
    available_threads, engine_settings, first_engine_info, machine, machine_name, resolve_model, run_sides, write_json,
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
# Child side: engine_sides' engine child runs this for the "accuracy" measurement (this module's name)


def measure_engine(llm, spec: dict, scratch: str) -> dict:
    """Full-vocabulary next-token log-probs per prompt, saved as a (prompts, vocab) float32 tensor;
    with ``spec["perplexity"]`` also each text's per-token negative log-likelihoods (prompt log-probs)."""
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
    result = {"logprobs_file": path, "vocab": vocab, "logprobs_returned": returned}
    if spec.get("perplexity"):
        result["token_nll"] = prompt_nll(llm, spec["perplexity"])
    return result


def prompt_nll(llm, texts: list[list[int]]) -> list[list[float]]:
    """-log p(token | preceding tokens) for every token but the first of each text, as vLLM scores it."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in texts], params, use_tqdm=False)
    return [[-step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:])]
            for out, ids in zip(outputs, texts)]


# --------------------------------------------------------------------------------------------
# Parent side: tokenizer, reference, comparison


def is_trained_model(model: str) -> bool:
    """A checkpoint written by vllm_bitcpm.testing.qat_training (it carries its training record)."""
    from vllm_bitcpm.testing.qat_training import read_record

    return Path(model).is_dir() and read_record(model) is not None


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


def reference_forward(model: str, kind: str, dtype_name: str, max_model_len: int, trust_remote_code: bool):
    """The float reference as a function: token ids -> logits of every position (seq, vocab)."""
    import torch

    dtype = getattr(torch, dtype_name)
    if kind == "minicpm":
        from vllm_bitcpm.testing.reference_model import ReferenceMiniCPM

        path = _local_checkpoint(model)
        config = json.loads((path / "config.json").read_text())
        scaling = config.get("rope_scaling") or {}
        original = scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings")
        # vLLM picks LongRoPE's factor set per engine, from max_model_len (reference_model docstring).
        reference = ReferenceMiniCPM.from_pretrained(
            path, dtype=dtype, use_long_factors=bool(original) and max_model_len > original)
        return reference.logits
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
                return hf_model(torch.tensor([ids])).logits[0]

        return forward


def reference_logits(model: str, prompt_ids: list[list[int]], kind: str, dtype_name: str,
                     max_model_len: int, trust_remote_code: bool) -> list:
    """Next-token logits of the float reference for every prompt (vocab,)."""
    import torch
    from tqdm import tqdm

    forward = reference_forward(model, kind, dtype_name, max_model_len, trust_remote_code)
    return [forward(ids)[-1].to(torch.float64) for ids in tqdm(prompt_ids, desc=f"{kind} reference", unit="prompt")]


def reference_nll(model: str, texts: list[list[int]], kind: str, dtype_name: str, max_model_len: int,
                  trust_remote_code: bool) -> list[list[float]]:
    """The reference's -log p of every token but the first of each text (what prompt_nll returns)."""
    import torch

    forward = reference_forward(model, kind, dtype_name, max_model_len, trust_remote_code)
    out = []
    for ids in texts:
        logp = torch.log_softmax(forward(ids).to(torch.float64), dim=-1)
        out.append((-logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).tolist())
    return out


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def compare_side(side_result: dict, ref_logits: list, prompts: list[str], tokenizer,
                 prompt_sets: dict[str, int] | None = None, ref_nll: list | None = None) -> dict:
    """Per-prompt comparisons and the summary of one candidate against the reference (also per
    prompt set, and the held-out perplexity where ``ref_nll`` is given)."""
    import torch

    from vllm_bitcpm.testing.accuracy import compare_next_token, summarize

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
    by_set, start = {}, 0
    for name, count in (prompt_sets or {}).items():
        by_set[name] = summarize(comparisons[start : start + count])
        start += count
    result = {"summary": summary, "bar_failures": bar_failures(summary), "summary_by_set": by_set,
              "per_prompt": rows, "logprobs_returned": side_result["accuracy"]["logprobs_returned"],
              "init_seconds": side_result.get("init_seconds")}
    if ref_nll is not None and "token_nll" in side_result["accuracy"]:
        result["perplexity"] = compare_perplexity(side_result["accuracy"]["token_nll"], ref_nll)
    return result


def perplexity_of(token_nll: list[list[float]]) -> dict:
    flat = [x for text in token_nll for x in text]
    mean = sum(flat) / len(flat)
    return {"tokens": len(flat), "mean_nll": mean, "perplexity": math.exp(mean)}


def compare_perplexity(side_nll: list[list[float]], ref_nll: list[list[float]]) -> dict:
    """The side's held-out perplexity, its relative difference to the reference's, and the mean
    absolute difference of the per-token log-likelihoods (what a perplexity average can hide)."""
    side, ref = perplexity_of(side_nll), perplexity_of(ref_nll)
    diffs = [abs(a - b) for s_text, r_text in zip(side_nll, ref_nll) for a, b in zip(s_text, r_text)]
    return {**side, "perplexity_rel_diff": side["perplexity"] / ref["perplexity"] - 1,
            "mean_abs_token_logprob_diff": sum(diffs) / len(diffs), "max_abs_token_logprob_diff": max(diffs)}


def prompt_sets(args, model: str) -> dict[str, list[str]]:
    """Named prompt sets: --prompt's, else the report's 7 and, for a model trained by
    vllm_bitcpm.testing.qat_training, prompts cut from held-out documents it never saw."""
    from vllm_bitcpm.testing.synthetic import REPORT_PROMPTS
    from vllm_bitcpm.testing.qat_training import read_record

    if args.prompts:
        return {"given prompts": list(args.prompts)}
    sets = {"report prompts": list(REPORT_PROMPTS)}
    record = read_record(model) if Path(model).is_dir() else None
    if record and record.get("held_out_prompts"):
        sets["held-out text"] = list(record["held_out_prompts"])
    return sets


#: Held-out perplexity: at most this many documents, each cut to this many tokens.
PERPLEXITY_TEXTS, PERPLEXITY_TOKENS = 16, 256


def held_out_texts(model: str, tokenizer, max_model_len: int) -> tuple[list[list[int]] | None, str]:
    """Token ids of held-out documents of a trained model's corpus (None for other models), and why."""
    from vllm_bitcpm.testing.offline_corpus import load_corpus
    from vllm_bitcpm.testing.qat_training import read_record

    record = read_record(model) if Path(model).is_dir() else None
    if record is None:
        return None, "not a model trained by vllm_bitcpm.testing.qat_training"
    corpus = load_corpus()
    if corpus.sha256 != record["corpus"]["sha256"]:
        return None, (f"this Python's corpus ({corpus.sources}, sha256 {corpus.sha256[:12]}) is not the one the "
                      f"model was trained on ({record['corpus']['sources']}, {record['corpus']['sha256'][:12]})")
    limit = min(PERPLEXITY_TOKENS, max_model_len - 1)
    texts = [tokenizer(doc).input_ids[:limit] for doc in corpus.held_out[:PERPLEXITY_TEXTS]]
    return [ids for ids in texts if len(ids) > 1], f"{PERPLEXITY_TEXTS} held-out documents, <= {limit} tokens each"


def reference_top10(ref_logits: list, tokenizer) -> list[list]:
    import torch

    out = []
    for ref in ref_logits:
        probs = torch.softmax(ref, dim=-1)
        top = torch.topk(probs, TOP_K)
        out.append([[int(t), _token(tokenizer, int(t)), float(p)] for p, t in zip(top.values, top.indices)])
    return out


def assemble(model: str, settings: dict, args, inputs: "AccuracyInputs", ref_logits, sides: dict,
             info: dict, ref_nll: list | None = None) -> dict:
    """The accuracy JSON: inputs, reference, and per candidate its summary and per-prompt rows."""
    from vllm_bitcpm.testing.qat_training import read_record

    sets = {name: len(prompts) for name, prompts in inputs.prompt_sets.items()}
    record = read_record(model) if Path(model).is_dir() else None
    return {
        "model": model, "settings": settings, "machine": info, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "reference": {"kind": args.reference, "dtype": args.reference_dtype,
                      "top10": reference_top10(ref_logits, inputs.tokenizer),
                      **({"perplexity": perplexity_of(ref_nll)} if ref_nll else {})},
        "prompts": inputs.prompts, "prompt_ids": inputs.prompt_ids, "prompt_sets": sets,
        "perplexity_texts": inputs.perplexity_why,
        "training": None if record is None else {k: v for k, v in record.items() if k != "loss_curve"},
        "published": PUBLISHED_ACCURACY,
        "candidates": {side: compare_side(result, ref_logits, inputs.prompts, inputs.tokenizer, sets, ref_nll)
                       for side, result in sides.items()},
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


def summary_table(result: dict, with_published: bool = True, prompt_set: str | None = None) -> str:
    """Metrics per side over all prompts, or over one ``prompt_set`` (e.g. "held-out text")."""
    sides = [s for s, c in result["candidates"].items() if "error" not in c]

    def summary(side: str) -> dict:
        c = result["candidates"][side]
        return c["summary"] if prompt_set is None else c["summary_by_set"][prompt_set]

    header = ["metric"] + [SIDE_LABELS[s] for s in sides]
    if with_published:
        header.append("published (Ascend 910B2, stock bf16)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, fmt in SUMMARY_ROWS:
        cells = [label] + [fmt(summary(s)) for s in sides]
        if with_published:
            cells.append(_published_cell(key, result["published"], 7))
        lines.append("| " + " | ".join(cells) + " |")
    failures = {s: bar_failures(summary(s)) for s in sides}
    bar = ["meets the project's bar"] + ["yes" if not failures[s] else "no: " + "; ".join(failures[s]) for s in sides]
    if with_published:
        bar.append("yes")
    lines.append("| " + " | ".join(bar) + " |")
    for side, c in result["candidates"].items():
        if "error" in c:
            lines.append(f"\n{SIDE_LABELS[side]} failed: {c['error']}")
    return "\n".join(lines)


def perplexity_table(result: dict) -> str:
    """Held-out perplexity per side beside the reference's ("" where none was measured)."""
    ref = result["reference"].get("perplexity")
    sides = [s for s, c in result["candidates"].items() if "perplexity" in c]
    if not ref or not sides:
        return ""
    lines = ["| | perplexity | vs reference | mean abs. token log-prob diff. | max |", "|---|---|---|---|---|",
             f"| {result['reference']['kind']} {result['reference']['dtype']} reference | {ref['perplexity']:.3f} "
             "| - | - | - |"]
    for side in sides:
        c = result["candidates"][side]["perplexity"]
        lines.append(f"| {SIDE_LABELS[side]} (engine {side_dtype(side, result['settings'])}) | {c['perplexity']:.3f} "
                     f"| {c['perplexity_rel_diff']:+.3%} | {c['mean_abs_token_logprob_diff']:.2e} "
                     f"| {c['max_abs_token_logprob_diff']:.2e} |")
    return "\n".join([f"Held-out perplexity ({result['perplexity_texts']}; {ref['tokens']} scored tokens):", "",
                      *lines])


def training_line(result: dict) -> str:
    """How trained the model is, for a reader judging the accuracy figures ("" if not trained here)."""
    t = result.get("training")
    if not t:
        return ""
    r = t["recipe"]
    return (f"Model trained by `python -m vllm_bitcpm.testing.qat_training`: {t['parameters'] / 1e6:.1f} M parameters "
            f"(hidden {r['hidden_size']}, {r['num_hidden_layers']} layers), ternary {r['granularity']} absmean QAT"
            f"{' (group ' + str(r['group_size']) + ')' if r['granularity'] == 'per_group' else ''}, "
            f"{t['tokens_seen'] / 1e6:.1f} M tokens seen of {t['corpus']['sources']}; train loss {t['train_loss']:.3f}, "
            f"held-out loss {t['held_out_loss']:.3f} nats (perplexity {t['held_out_perplexity']:.1f}; a unigram model "
            f"scores {t['unigram_entropy_nats']:.3f}).")


def prompts_description(result: dict) -> str:
    """E.g. "7 prompts of the published report + 8 cut from held-out text"."""
    sets = result.get("prompt_sets") or {"report prompts": len(result["prompts"])}
    names = {"report prompts": "prompts of the published report", "held-out text": "cut from held-out text",
             "given prompts": "given prompts"}
    return " + ".join(f"{count} {names.get(name, name)}" for name, count in sets.items())


def summary_markdown(result: dict) -> str:
    """Training line, summary table(s) per prompt set and the perplexity table: no per-prompt rows."""
    parts = [training_line(result), ""] if result.get("training") else []
    sets = result.get("prompt_sets") or {}
    if len(sets) > 1:
        for name, count in sets.items():
            parts += [f"**{name}** ({count} prompts):", "", summary_table(result, name == "report prompts", name), ""]
    else:
        parts += [summary_table(result), ""]
    if table := perplexity_table(result):
        parts += [table, ""]
    return "\n".join(parts).strip("\n")


def markdown(result: dict) -> str:
    parts = [summary_markdown(result), ""]
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


@dataclasses.dataclass
class AccuracyInputs:
    """What every side and the reference are given: identical token ids for all of them."""

    prompt_sets: dict[str, list[str]]
    prompts: list[str]
    prompt_ids: list[list[int]]
    tokenizer: object
    perplexity_ids: list[list[int]] | None
    perplexity_why: str

    def engine_spec(self) -> dict:
        return {"prompts": self.prompt_ids, **({"perplexity": self.perplexity_ids} if self.perplexity_ids else {})}


def prepare(args, model: str, max_model_len: int) -> AccuracyInputs:
    """Prompts (by set), their token ids, held-out texts for the perplexity, and the tokenizer."""
    sets = prompt_sets(args, model)
    prompts = [p for group in sets.values() for p in group]
    tokenizer = load_tokenizer(model, args.trust_remote_code)
    texts, why = held_out_texts(model, tokenizer, max_model_len)
    return AccuracyInputs(sets, prompts, [tokenizer(p).input_ids for p in prompts], tokenizer, texts, why)


def reference_for(args, model: str, inputs: AccuracyInputs, max_model_len: int) -> tuple[list, list | None]:
    """The reference's next-token logits per prompt and, where there are held-out texts, its token NLLs."""
    ref_logits = reference_logits(model, inputs.prompt_ids, args.reference, args.reference_dtype,
                                  max_model_len, args.trust_remote_code)
    ref_nll = None
    if inputs.perplexity_ids:
        ref_nll = reference_nll(model, inputs.perplexity_ids, args.reference, args.reference_dtype,
                                max_model_len, args.trust_remote_code)
    return ref_logits, ref_nll


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
    if args.sides == DEFAULT_SIDES and is_trained_model(model):
        args.sides = list(TRAINED_MODEL_SIDES)
    settings = engine_settings(args, full_vocab_logprobs=True)
    inputs = prepare(args, model, settings["max_model_len"])
    ref_logits, ref_nll = reference_for(args, model, inputs, settings["max_model_len"])
    with tqdm(total=len(args.sides), unit="engine") as bar:
        sides = run_sides(model, settings, {"accuracy": inputs.engine_spec()}, args.sides, args.threads, bar)
    result = assemble(model, settings, args, inputs, ref_logits, sides, machine(first_engine_info(sides)), ref_nll)
    print(f"\n### Accuracy: {Path(model).name}, engine {args.dtype}, vs {args.reference} {args.reference_dtype}\n")
    print(markdown(result))
    out = write_json(args.out, result, ensure_ascii=False)
    print(f"wrote {out}")
    if plot(result, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
