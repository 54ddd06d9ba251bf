"""Random BitCPM weights whose magnitudes make every architectural component matter.

Its own module because the weight recipe is the delicate part of a synthetic checkpoint: the
gains below are tuned (against ``vllm_bitcpm.testing.reference_model``) so that a wrong RoPE
base or LongRoPE factors, a missing residual scale or a missing causal mask changes top-1
predictions. It only describes tensors (``TensorSpec``); ``writers`` streams them to disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence

import torch

from vllm_bitcpm.testing.synthetic.shapes import (
    DIM_MODEL_BASE,
    SCALE_DEPTH,
    SCALE_EMB,
    ModelShape,
    linear_weight_names,
)

#: How ternary scales are shared (``dense``: ordinary non-ternary weights).
GRANULARITIES = ("per_tensor", "per_row", "per_group", "dense")

# Magnitudes, expressed as the RMS a projection produces from an RMS-1 input.
# Chosen by measuring with reference_model: a wrong RoPE base, ignored or wrong
# LongRoPE factors, a missing residual scale and a missing causal mask each
# change top-1 predictions on several prompts. The price of that sensitivity is
# that bf16 activations are not negligible either (random weights are less
# smooth than trained ones): compare engines against the reference in float32.
TARGET_LOGIT_STD = 1.5     # std of the output logits over the vocabulary
QK_GAIN = 1.5              # with SLOW_PAIR_GAIN, attention logits get a std of ~4
V_GAIN = 1.0
GATE_GAIN = 1.5
UP_GAIN = 1.0
ATTN_BRANCH_RATIO = 1.0    # scaled attention output RMS / embedding-term RMS
MLP_BRANCH_RATIO = 0.64    # scaled MLP output RMS / embedding-term RMS
SWIGLU_RMS = 0.96          # RMS of silu(gate) * up for GATE_GAIN and UP_GAIN (measured)
EMBED_NORM_SPREAD = 0.7    # log-normal spread of embedding row norms
SCALE_SPREAD = 0.35        # per-row / per-group scales vary by exp(+-SCALE_SPREAD)
TERNARY_DENSITY = 2.0 / 3.0
UNUSED_EMBEDDING_SHRINK = 0.5  # rows past the tokenizer are rarely predicted
FAST_PAIR_FRACTION = 0.25  # this fraction of rotary pairs (the fastest) carries most q/k energy
SLOW_PAIR_GAIN = 0.25      # relative q/k gain of the slowly rotating pairs


def qk_row_gains(num_heads: int, head_dim: int) -> torch.Tensor:
    """Relative gain of each q/k output row, RMS 1 over a head.

    RoPE rotates pair ``i`` (rows ``i`` and ``i + head_dim/2`` of a head) by
    ``pos * inv_freq_i``; only the fast pairs rotate enough over a short prompt
    for a wrong base or factor to show. Concentrating the query/key energy
    there makes attention depend on RoPE more than on rounding noise.
    """
    half = head_dim // 2
    pair_gain = torch.full((half,), SLOW_PAIR_GAIN)
    pair_gain[: max(1, round(half * FAST_PAIR_FRACTION))] = 1.0
    head = torch.cat((pair_gain, pair_gain))
    head = head / head.pow(2).mean().sqrt()
    return head.repeat(num_heads)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its name, its shape and how to make its values (lazily)."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[torch.Generator], torch.Tensor]

    def generate(self, seed: int) -> torch.Tensor:
        """The tensor's values for ``seed``, from a generator of its own (see :func:`_generator`)."""
        return self.make(_generator(seed, self.name))


def _generator(seed: int, name: str) -> torch.Generator:
    """One generator per tensor, so each tensor is reproducible on its own."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _round_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values exactly representable in ``dtype`` (kept as float32)."""
    return values.to(dtype).to(torch.float32)


def _ternary_codes(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """Uniform over {-1, 0, 1} (about one third zeros), as int8."""
    return torch.randint(-1, 2, (rows, cols), generator=gen, dtype=torch.int8)


def _no_empty_groups(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Give every scale group a nonzero code so its scale can be recovered."""
    rows, cols = codes.shape
    for start in range(0, cols, group_size):
        group = codes[:, start : start + group_size]
        empty = (group == 0).all(dim=1)
        group[empty, 0] = 1
    return codes


def _scale_grid(
    gen: torch.Generator, rows: int, cols: int, granularity: str, group_size: int,
    base_scale: float, row_gains: torch.Tensor, dtype: torch.dtype,
) -> torch.Tensor:
    """Scales broadcastable to (rows, cols), already rounded to ``dtype``."""
    if granularity == "per_tensor":
        grid_shape = (1, 1)
    elif granularity == "per_row":
        grid_shape = (rows, 1)
    else:
        grid_shape = (rows, math.ceil(cols / group_size))
    spread = (torch.rand(grid_shape, generator=gen) * 2 - 1) * SCALE_SPREAD
    scales = _round_to(base_scale * row_gains * torch.exp(spread), dtype)
    if granularity == "per_group":
        scales = scales.repeat_interleave(group_size, dim=1)[:, :cols]
    return scales


def _linear_weight(
    gen: torch.Generator, rows: int, cols: int, gain: float, granularity: str,
    group_size: int, dtype: torch.dtype, row_gains: torch.Tensor | None = None,
) -> torch.Tensor:
    """A (rows, cols) weight whose output RMS is about ``gain`` for RMS-1 input.

    ``row_gains`` (RMS 1) shapes the output rows: through the scales where each
    row has its own, through the share of zero codes for ``per_tensor``.
    """
    if row_gains is None:
        row_gains = torch.ones(rows)
    row_gains = row_gains[:, None]
    if granularity == "dense":
        scale = gain / math.sqrt(cols)
        return (torch.randn(rows, cols, generator=gen) * scale * row_gains).to(dtype)
    codes = _ternary_codes(gen, rows, cols)
    base_scale = gain / math.sqrt(TERNARY_DENSITY * cols)
    if granularity == "per_tensor":
        keep = row_gains.pow(2) / row_gains.pow(2).max()
        codes[torch.rand(rows, cols, generator=gen) >= keep] = 0
        base_scale = base_scale * float(row_gains.pow(2).max().sqrt())
        row_gains = torch.ones_like(row_gains)
    effective_group = group_size if granularity == "per_group" else cols
    codes = _no_empty_groups(codes, effective_group)
    scales = _scale_grid(gen, rows, cols, granularity, group_size, base_scale, row_gains, dtype)
    # Scales are exact in dtype and codes are 0/+-1, so the product is exact.
    return codes.to(dtype) * scales.to(dtype)


def tensor_specs(
    shape: ModelShape,
    vocab_size: int,
    tokenizer_size: int,
    granularity: str,
    group_size: int,
    dtype: torch.dtype,
    non_ternary_layers: Sequence[str],
) -> list[TensorSpec]:
    """Every tensor of a checkpoint of ``shape``, in checkpoint order; nothing is generated yet."""
    hidden, layers = shape.hidden_size, shape.num_hidden_layers
    head_dim = shape.head_dim
    llama = shape.architecture == "llama"
    residual_scale = 1.0 if llama else SCALE_DEPTH / math.sqrt(layers)

    if llama:
        # No muP: an RMS-1 embedding, and the (untied) head alone sets the logit spread.
        embed_std = 1.0
        embedding_rms = embed_std
    else:
        # Logits are (normed hidden / (hidden / 256)) @ embed.T, so the embedding
        # std fixes the logit spread; the embedding term's RMS is 12 * that std.
        embed_std = TARGET_LOGIT_STD * (hidden / DIM_MODEL_BASE) / math.sqrt(hidden)
        embedding_rms = SCALE_EMB * embed_std
    # Branch outputs, after the residual scale, match the embedding term.
    o_gain = ATTN_BRANCH_RATIO * embedding_rms / residual_scale / V_GAIN
    down_gain = MLP_BRANCH_RATIO * embedding_rms / residual_scale / SWIGLU_RMS

    q_row_gains = qk_row_gains(shape.num_attention_heads, head_dim)
    k_row_gains = qk_row_gains(shape.num_key_value_heads, head_dim)

    unknown = set(non_ternary_layers) - set(linear_weight_names(layers, shape))
    if unknown:
        raise ValueError(f"non_ternary_layers are not linear weights: {sorted(unknown)}")

    def linear(name: str, rows: int, cols: int, gain: float, row_gains=None) -> TensorSpec:
        kind = "dense" if name in non_ternary_layers else granularity
        return TensorSpec(
            name, (rows, cols),
            lambda gen: _linear_weight(gen, rows, cols, gain, kind, group_size, dtype, row_gains),
        )

    def norm(name: str, width: int = hidden) -> TensorSpec:
        return TensorSpec(
            name, (width,),
            lambda gen: (1.0 + 0.1 * torch.randn(width, generator=gen)).abs().to(dtype),
        )

    def embedding(gen: torch.Generator) -> torch.Tensor:
        table = torch.randn(vocab_size, hidden, generator=gen) * embed_std
        # Rows of varied norm spread out the top logits, so that the top-10
        # set is not decided by differences far below bf16 rounding.
        row_norm = torch.exp(torch.randn(vocab_size, 1, generator=gen) * EMBED_NORM_SPREAD)
        table *= row_norm / row_norm.pow(2).mean().sqrt()
        table[tokenizer_size:] *= UNUSED_EMBEDDING_SHRINK
        return table.to(dtype)

    def head(gen: torch.Generator) -> torch.Tensor:
        table = torch.randn(vocab_size, hidden, generator=gen) * (TARGET_LOGIT_STD / math.sqrt(hidden))
        row_norm = torch.exp(torch.randn(vocab_size, 1, generator=gen) * EMBED_NORM_SPREAD)
        table *= row_norm / row_norm.pow(2).mean().sqrt()
        table[tokenizer_size:] *= UNUSED_EMBEDDING_SHRINK
        return table.to(dtype)

    def attention(p: str, sizes: dict[str, tuple[int, int]]) -> list[TensorSpec]:
        def proj(name: str, gain: float, row_gains=None) -> TensorSpec:
            full = f"{p}.self_attn.{name}.weight"
            return linear(full, *sizes[full], gain, row_gains)

        if shape.architecture != "minicpm3":
            return [proj("q_proj", QK_GAIN, q_row_gains), proj("k_proj", QK_GAIN, k_row_gains),
                    proj("v_proj", V_GAIN), proj("o_proj", o_gain)]
        # MLA: each low-rank projection is followed by an RMSNorm (gain 1 is enough); the
        # RoPE part of k comes straight from kv_a_proj_with_mqa, the no-RoPE part of k and v
        # from kv_b_proj.
        return [
            proj("q_a_proj", 1.0),
            norm(f"{p}.self_attn.q_a_layernorm.weight", shape.q_lora_rank),
            proj("q_b_proj", QK_GAIN),
            proj("kv_a_proj_with_mqa", QK_GAIN),
            norm(f"{p}.self_attn.kv_a_layernorm.weight", shape.kv_lora_rank),
            proj("kv_b_proj", V_GAIN),
            proj("o_proj", o_gain),
        ]

    specs = [TensorSpec("model.embed_tokens.weight", (vocab_size, hidden), embedding)]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        sizes = shape.linear_shapes(layer)
        specs += [norm(f"{p}.input_layernorm.weight"), *attention(p, sizes),
                  norm(f"{p}.post_attention_layernorm.weight")]
        specs += [
            linear(f"{p}.mlp.gate_proj.weight", *sizes[f"{p}.mlp.gate_proj.weight"], GATE_GAIN),
            linear(f"{p}.mlp.up_proj.weight", *sizes[f"{p}.mlp.up_proj.weight"], UP_GAIN),
            linear(f"{p}.mlp.down_proj.weight", *sizes[f"{p}.mlp.down_proj.weight"], down_gain),
        ]
    specs.append(norm("model.norm.weight"))
    if not shape.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (vocab_size, hidden), head))
    return specs
