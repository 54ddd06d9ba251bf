"""An independent MiniCPM / BitCPM4 forward pass: the accuracy oracle.

Written from the architecture's definition in plain PyTorch (no vLLM, no
transformers modelling code) and run in float64 or float32, so that vLLM's
output can be checked against something that shares none of its code. Ternary
checkpoints are fake-quantized (``W = T * S`` stored as floats), so they load
as ordinary weights here.

The architecture::

    h = embed(ids) * scale_emb
    for each layer:
        h = h + attn(rmsnorm(h)) * scale_depth / sqrt(num_hidden_layers)
        h = h + mlp(rmsnorm(h))  * scale_depth / sqrt(num_hidden_layers)
    logits = rmsnorm(h) / (hidden_size / dim_model_base) @ embed.T   (tied)

with GQA attention, NeoX-style ("rotate_half") RoPE on the full head_dim, a
causal mask, ``softmax(q.k / sqrt(head_dim))`` and a SiLU-gated MLP.

LongRoPE (``rope_scaling.rope_type == "longrope"``): ``inv_freq_i = 1 /
(factor_i * theta ** (2i / head_dim))`` and cos/sin are multiplied by the
attention factor ``sqrt(1 + ln(s) / ln(orig))`` where ``s = max_position_embeddings
/ orig`` (1.0 when ``s <= 1``). Which factors apply differs between
implementations; all three agree whenever the sequence and vLLM's
``max_model_len`` are both at most ``original_max_position_embeddings``:

* transformers' generic ``longrope``: long factors when the current sequence
  length exceeds ``original_max_position_embeddings`` (the default here,
  ``use_long_factors=None``), else short factors.
* MiniCPM's remote code (``MiniCPMLongRoPE``): chooses when it builds its
  cos/sin cache, whose length is ``max(max_position_embeddings, seq_len)``, so
  in practice the long factors whenever ``max_position_embeddings >
  original_max_position_embeddings``.
* vLLM 0.32 (``Phi3LongRoPEScaledRotaryEmbedding``): not per position and not
  per sequence but per engine: long factors for every position of every
  request when ``max_model_len > original_max_position_embeddings``, short
  otherwise. Pass ``use_long_factors=True`` to compare against such an engine.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["GreedyResult", "ReferenceMiniCPM", "rms_norm", "rope_cos_sin", "rotate_half"]


class GreedyResult(NamedTuple):
    """Greedy continuation, with the top-1 minus top-2 logit gap of each step.

    Small gaps mark near-ties where a correct low-precision engine may
    legitimately pick the other token.
    """

    tokens: list[int]
    top2_gaps: list[float]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotation: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    factors: Sequence[float] | None = None,
    attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (len(positions), head_dim), computed in float64."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if factors is not None:
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float64)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def _load_weights(path: pathlib.Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file, converted one at a time."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    weights = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name).to(dtype)
    return weights


class ReferenceMiniCPM:
    """Full-prompt MiniCPM forward (no KV cache) in a chosen float dtype.

    ``use_long_factors`` forces the LongRoPE factor set (see the module
    docstring); ``activation_dtype=torch.bfloat16`` rounds every tensor an
    engine stores (projection outputs, rotated q/k, residual stream, norms,
    logits) to estimate the noise floor of a bf16 engine.

    The keyword-only ``rope_theta``, ``ignore_longrope_factors``,
    ``no_residual_scale`` and ``no_causal_mask`` arguments deliberately break
    the model; they exist so that tests can prove the comparison against this
    oracle is able to fail.
    """

    def __init__(
        self,
        config: dict,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float64,
        *,
        use_long_factors: bool | None = None,
        activation_dtype: torch.dtype | None = None,
        rope_theta: float | None = None,
        ignore_longrope_factors: bool = False,
        no_residual_scale: bool = False,
        no_causal_mask: bool = False,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.weights = weights
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_hidden_layers"]
        self.num_heads = config["num_attention_heads"]
        self.num_kv_heads = config.get("num_key_value_heads") or self.num_heads
        self.head_dim = config.get("head_dim") or self.hidden_size // self.num_heads
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.scale_emb = config.get("scale_emb", 1.0)
        self.residual_scale = config.get("scale_depth", 1.0) / math.sqrt(self.num_layers)
        self.logit_divisor = self.hidden_size / config.get("dim_model_base", self.hidden_size)
        scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
        default_theta = config.get("rope_theta") or scaling.get("rope_theta") or 10000.0
        self.rope_theta = rope_theta if rope_theta is not None else default_theta
        self.use_long_factors = use_long_factors
        self.activation_dtype = activation_dtype
        self.ignore_longrope_factors = ignore_longrope_factors
        self.no_residual_scale = no_residual_scale
        self.no_causal_mask = no_causal_mask

        if config.get("tie_word_embeddings", True) or "lm_head.weight" not in weights:
            self.lm_head = weights["model.embed_tokens.weight"]
        else:
            self.lm_head = weights["lm_head.weight"]

        rope_type = scaling.get("rope_type") or scaling.get("type")
        if rope_type in (None, "default"):
            self.longrope = None
        elif rope_type == "longrope":
            self.longrope = scaling
        else:
            raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported")

    @classmethod
    def from_pretrained(
        cls, path: str | pathlib.Path, dtype: torch.dtype = torch.float64, **options
    ) -> "ReferenceMiniCPM":
        """Load ``config.json`` and the safetensors weights of a checkpoint directory."""
        path = pathlib.Path(path)
        config = json.loads((path / "config.json").read_text())
        return cls(config, _load_weights(path, dtype), dtype, **options)

    # -- pieces ------------------------------------------------------------

    def _w(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        """Round to ``activation_dtype`` where an engine would store a tensor."""
        if self.activation_dtype is None:
            return x
        return x.to(self.activation_dtype).to(self.dtype)

    def rotary_cos_sin(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (seq_len, 1, head_dim) used for a sequence of this length."""
        positions = torch.arange(seq_len)
        factors, attention_factor = None, 1.0
        if self.longrope is not None:
            max_positions = self.config["max_position_embeddings"]
            original = self.longrope.get("original_max_position_embeddings") or max_positions
            use_long = self.use_long_factors
            if use_long is None:
                use_long = seq_len > original
            if not self.ignore_longrope_factors:
                factors = self.longrope["long_factor" if use_long else "short_factor"]
            scale = max_positions / original
            if scale > 1.0:
                attention_factor = math.sqrt(1 + math.log(scale) / math.log(original))
        cos, sin = rope_cos_sin(
            positions, self.head_dim, self.rope_theta, factors, attention_factor
        )
        return cos.to(self.dtype)[:, None, :], sin.to(self.dtype)[:, None, :]

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self._store(x @ self._w(name).T)

    def _attention(self, x: torch.Tensor, prefix: str, cos: torch.Tensor, sin: torch.Tensor):
        seq = x.shape[0]
        q = self._linear(x, f"{prefix}.q_proj.weight").view(seq, self.num_heads, self.head_dim)
        k = self._linear(x, f"{prefix}.k_proj.weight").view(seq, self.num_kv_heads, self.head_dim)
        v = self._linear(x, f"{prefix}.v_proj.weight").view(seq, self.num_kv_heads, self.head_dim)
        q = self._store(q * cos + rotate_half(q) * sin)
        k = self._store(k * cos + rotate_half(k) * sin)
        group = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.head_dim)
        if not self.no_causal_mask:
            future = torch.ones(seq, seq, dtype=torch.bool).triu(diagonal=1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("hqk,khd->qhd", probs, v).reshape(seq, self.num_heads * self.head_dim)
        return self._linear(self._store(out), f"{prefix}.o_proj.weight")

    def _mlp(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        gate = self._linear(x, f"{prefix}.gate_proj.weight")
        up = self._linear(x, f"{prefix}.up_proj.weight")
        hidden = self._store(torch.nn.functional.silu(gate) * up)
        return self._linear(hidden, f"{prefix}.down_proj.weight")

    # -- public ------------------------------------------------------------

    @torch.no_grad()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits for every position of the prompt, shape (seq, vocab)."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("token_ids is empty")
        residual_scale = 1.0 if self.no_residual_scale else self.residual_scale
        cos, sin = self.rotary_cos_sin(ids.numel())
        h = self._store(self._w("model.embed_tokens.weight")[ids] * self.scale_emb)
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}"
            x = self._store(rms_norm(h, self._w(f"{p}.input_layernorm.weight"), self.eps))
            h = self._store(h + self._attention(x, f"{p}.self_attn", cos, sin) * residual_scale)
            x = self._store(rms_norm(h, self._w(f"{p}.post_attention_layernorm.weight"), self.eps))
            h = self._store(h + self._mlp(x, f"{p}.mlp") * residual_scale)
        h = self._store(rms_norm(h, self._w("model.norm.weight"), self.eps) / self.logit_divisor)
        return self._store(h @ self.lm_head.T)

    def next_token_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits of the token following the prompt, shape (vocab,)."""
        return self.logits(token_ids)[-1]

    def greedy(
        self,
        token_ids: Sequence[int],
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
    ) -> GreedyResult:
        """Greedy decoding by recomputing the full prompt each step (no KV cache)."""
        ids = list(token_ids)
        tokens: list[int] = []
        gaps: list[float] = []
        for _ in range(max_new_tokens):
            top2 = self.next_token_logits(ids).topk(2)
            token = int(top2.indices[0])
            tokens.append(token)
            gaps.append(float(top2.values[0] - top2.values[1]))
            ids.append(token)
            if token in stop_token_ids:
                break
        return GreedyResult(tokens, gaps)
