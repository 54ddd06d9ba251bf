"""Next-token agreement metrics between a reference and a candidate model.

The same measures as the published accuracy report: for each prompt, compare
the reference's next-token distribution with the candidate's (top-1 match,
top-5 inclusion, top-10 overlap, probability errors, KL), then aggregate over
prompts and check the project's bar.

The candidate is either full logits / log-probs over the vocabulary, or only
its top-k log-probs as ``{token_id: logprob}`` (what vLLM returns). With top-k
only, a token missing from the dict is taken to have probability 0, which can
only overstate an error, and the full-distribution metrics (max abs error,
RMSE, KL) are ``None``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "ACCURACY_BAR",
    "NextTokenComparison",
    "bar_failures",
    "compare_next_token",
    "meets_accuracy_bar",
    "summarize",
]

Candidate = torch.Tensor | Mapping[int, float]

#: The project's bar: top-1 agreement on every prompt, near-identical top-10
#: sets and top-1 probabilities within 1 % on average.
ACCURACY_BAR = {
    "top1_match_rate": 1.0,
    "mean_top10_overlap": 9.5,
    "mean_top1_prob_rel_error": 0.01,
}


@dataclasses.dataclass(frozen=True)
class NextTokenComparison:
    """Agreement of one prompt's next-token distributions."""

    ref_top1: int
    cand_top1: int
    top1_match: bool              # candidate ranks the reference top-1 first (ties count)
    top5_inclusion: bool          # reference top-1 is in the candidate's top-5 (ties count)
    top10_overlap: int            # |top10(ref) & top10(cand)|
    ref_top1_prob: float
    top1_prob_rel_error: float    # |p_cand(ref_top1) - p_ref(ref_top1)| / p_ref(ref_top1)
    top10_prob_mae: float         # mean |p_cand - p_ref| over the reference's top-10 tokens
    max_abs_error: float | None   # max |p_cand - p_ref| over the vocabulary
    rmse: float | None            # RMS of p_cand - p_ref over the vocabulary
    kl: float | None              # KL(ref || cand) over the vocabulary, in nats


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities in float64; idempotent, so log-probs may be passed too."""
    return torch.log_softmax(logits.detach().to(torch.float64).flatten(), dim=-1)


def _top(values: torch.Tensor, k: int) -> list[int]:
    return values.topk(min(k, values.numel())).indices.tolist()


def compare_next_token(ref_logits: torch.Tensor, candidate: Candidate) -> NextTokenComparison:
    """Compare one prompt: reference logits (vocab,) against candidate logits or top-k dict."""
    ref_lp = _log_probs(ref_logits)
    ref_p = ref_lp.exp()
    ref_top10 = _top(ref_lp, 10)
    ref_top1 = ref_top10[0]

    if isinstance(candidate, Mapping):
        cand_lp_of = {int(token): float(lp) for token, lp in candidate.items()}
        cand_ranking = sorted(cand_lp_of, key=cand_lp_of.__getitem__, reverse=True)

        def p_cand(token: int) -> float:
            return math.exp(cand_lp_of[token]) if token in cand_lp_of else 0.0

        ranked_values = [cand_lp_of[t] for t in cand_ranking]
        ref_top1_value = cand_lp_of.get(ref_top1, -math.inf)
        full_metrics = (None, None, None)
    else:
        cand_lp = _log_probs(candidate)
        if cand_lp.numel() != ref_lp.numel():
            raise ValueError(f"vocab sizes differ: {ref_lp.numel()} vs {cand_lp.numel()}")
        cand_ranking = _top(cand_lp, 10)
        cand_p = cand_lp.exp()

        def p_cand(token: int) -> float:
            return float(cand_p[token])

        ranked_values = cand_lp[cand_ranking].tolist()
        ref_top1_value = float(cand_lp[ref_top1])
        diff = cand_p - ref_p
        kl = float((ref_p * (ref_lp - cand_lp)).sum())
        full_metrics = (float(diff.abs().max()), float(diff.pow(2).mean().sqrt()), kl)

    # A candidate that ties the reference's top-1 with its own best (common
    # with bf16 logits) agrees with the reference; ranks alone would be arbitrary.
    top1_match = ref_top1_value >= ranked_values[0]
    top5_inclusion = ref_top1_value >= ranked_values[min(5, len(ranked_values)) - 1]
    ref_top1_prob = float(ref_p[ref_top1])
    top10_errors = [abs(p_cand(t) - float(ref_p[t])) for t in ref_top10]
    return NextTokenComparison(
        ref_top1=ref_top1,
        cand_top1=cand_ranking[0],
        top1_match=top1_match,
        top5_inclusion=top5_inclusion,
        top10_overlap=len(set(ref_top10) & set(cand_ranking[:10])),
        ref_top1_prob=ref_top1_prob,
        top1_prob_rel_error=abs(p_cand(ref_top1) - ref_top1_prob) / ref_top1_prob,
        top10_prob_mae=sum(top10_errors) / len(top10_errors),
        max_abs_error=full_metrics[0],
        rmse=full_metrics[1],
        kl=full_metrics[2],
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarize(comparisons: Sequence[NextTokenComparison]) -> dict[str, float | int | None]:
    """Aggregate per-prompt comparisons into the report's summary numbers."""
    if not comparisons:
        raise ValueError("no comparisons to summarize")
    c = comparisons
    summary: dict[str, float | int | None] = {
        "num_prompts": len(c),
        "top1_match_rate": _mean([float(x.top1_match) for x in c]),
        "top5_inclusion_rate": _mean([float(x.top5_inclusion) for x in c]),
        "mean_top10_overlap": _mean([x.top10_overlap for x in c]),
        "min_top10_overlap": min(x.top10_overlap for x in c),
        "mean_top1_prob_rel_error": _mean([x.top1_prob_rel_error for x in c]),
        "max_top1_prob_rel_error": max(x.top1_prob_rel_error for x in c),
        "mean_top10_prob_mae": _mean([x.top10_prob_mae for x in c]),
    }
    full = [x for x in c if x.kl is not None]
    if len(full) == len(c):
        summary["max_abs_error"] = max(x.max_abs_error for x in full)
        summary["mean_rmse"] = _mean([x.rmse for x in full])
        summary["mean_kl"] = _mean([x.kl for x in full])
        summary["max_kl"] = max(x.kl for x in full)
    else:
        summary.update(max_abs_error=None, mean_rmse=None, mean_kl=None, max_kl=None)
    return summary


def bar_failures(summary: Mapping[str, float | int | None]) -> list[str]:
    """Human-readable reasons a summary misses ``ACCURACY_BAR`` (empty if it passes)."""
    failures = []
    if summary["top1_match_rate"] < ACCURACY_BAR["top1_match_rate"]:
        failures.append(f"top-1 match rate {summary['top1_match_rate']:.3f} < 1")
    if summary["mean_top10_overlap"] < ACCURACY_BAR["mean_top10_overlap"]:
        failures.append(
            f"mean top-10 overlap {summary['mean_top10_overlap']:.2f}"
            f" < {ACCURACY_BAR['mean_top10_overlap']}"
        )
    if not summary["mean_top1_prob_rel_error"] < ACCURACY_BAR["mean_top1_prob_rel_error"]:
        failures.append(
            f"mean top-1 probability relative error {summary['mean_top1_prob_rel_error']:.2%}"
            f" >= {ACCURACY_BAR['mean_top1_prob_rel_error']:.0%}"
        )
    return failures


def meets_accuracy_bar(summary: Mapping[str, float | int | None]) -> bool:
    return not bar_failures(summary)
