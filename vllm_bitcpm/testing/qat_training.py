"""Train a small MiniCPM with BitCPM-style QAT: a trained ternary model to judge accuracy on.

The real BitCPM4 weights cannot be downloaded here, and random synthetic weights give flat
next-token distributions that magnify every bf16 rounding. A model trained the way BitCPM is
trained has the peaked distributions of the real releases:

* every linear weight of the decoder is fake-quantized in the forward pass,
  ``W_q = clamp(round(W / s), -1, 1) * s`` with an absmean scale ``s = mean(|W|)`` per output
  row or per group of input columns, and the gradient passes straight through to the latent
  float ``W`` (straight-through estimator); activations, embedding and norms stay float;
* MiniCPM's muP scalings (``scale_emb``, ``scale_depth / sqrt(layers)`` on each residual
  branch, logits divided by ``hidden_size / dim_model_base``), tied embeddings, GQA, and
  LongRoPE's short factors (the set every engine uses up to 32k positions);
* text: ``vllm_bitcpm.testing.offline_corpus`` (English docs that ship with CPython), with a
  byte-level BPE tokenizer trained on its training split.

The result is written exactly like the real releases: a ``MiniCPMForCausalLM`` checkpoint,
``model_type: minicpm``, bf16 weights equal to ternary x scale, plus ``bitcpm_training.json``
(recipe, corpus hash, loss curve, held-out perplexity, held-out prompts for the reports).
Seeded and deterministic for a given machine and thread count.

    .venv/bin/python -m vllm_bitcpm.testing.qat_training checkpoints/trained-bitcpm-tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vllm_bitcpm.testing import synthetic
from vllm_bitcpm.testing.reference_model import rms_norm, rope_cos_sin, rotate_half

__all__ = ["RECIPES", "TRAINING_RECORD", "QATMiniCPM", "TrainingRecipe", "ensure_trained", "fake_quantize",
           "ternary_quantize", "train"]

TRAINING_RECORD = "bitcpm_training.json"
DEFAULT_CHECKPOINT = "checkpoints/trained-bitcpm-tiny"


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """Model shape and optimisation settings; the record of a trained checkpoint repeats it."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tokenizer_vocab: int = 4096
    granularity: str = "per_group"  # or "per_row"
    group_size: int = 64
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1000
    learning_rate: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.05
    seed: int = 0
    held_out_tokens: int = 16384  # evaluated for the perplexity
    held_out_prompts: int = 8  # prompts for the accuracy reports, from held-out documents

    def shape(self, vocab_size: int) -> synthetic.ModelShape:
        return synthetic.ModelShape(self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                                    self.num_attention_heads, self.num_key_value_heads, vocab_size=vocab_size)


RECIPES = {
    # The documented model (README, reports, demo): ~4 M parameters, minutes on 2 cores.
    "default": TrainingRecipe(),
    # Tests: the same code path in seconds; not trained enough to talk.
    "test": TrainingRecipe(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tokenizer_vocab=512, seq_len=32, batch_size=8, steps=30,
                           warmup_steps=5, held_out_tokens=1024, held_out_prompts=3),
}


# --------------------------------------------------------------------------------------------
# Ternary fake quantization (BitNet b1.58 absmean, as BitCPM's QAT)


def ternary_quantize(weight: torch.Tensor, granularity: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, 1}, scales broadcastable to ``weight``): absmean scales per row or group."""
    rows, cols = weight.shape
    if granularity == "per_row":
        grouped = weight.reshape(rows, 1, cols)
    elif granularity == "per_group":
        if cols % group_size:
            raise ValueError(f"per_group QAT needs in_features ({cols}) to be a multiple of group_size ({group_size})")
        grouped = weight.reshape(rows, cols // group_size, group_size)
    else:
        raise ValueError(f"granularity must be per_row or per_group, got {granularity!r}")
    scales = grouped.abs().mean(dim=-1, keepdim=True).clamp_min(1e-8)
    codes = (grouped / scales).round().clamp(-1, 1)
    return codes.reshape(rows, cols), scales.expand_as(grouped).reshape(rows, cols)


def fake_quantize(weight: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """``codes * scales`` in the forward pass, identity in the backward (straight-through)."""
    codes, scales = ternary_quantize(weight.detach(), granularity, group_size)
    return weight + (codes * scales - weight).detach()


# --------------------------------------------------------------------------------------------
# The model


class QATMiniCPM(torch.nn.Module):
    """Batched MiniCPM forward for training; parameters keyed by their HF checkpoint names."""

    def __init__(self, recipe: TrainingRecipe, config: dict) -> None:
        super().__init__()
        self.recipe = recipe
        self.config = config
        hidden, layers = recipe.hidden_size, recipe.num_hidden_layers
        self.head_dim = hidden // recipe.num_attention_heads
        self.residual_scale = config["scale_depth"] / math.sqrt(layers)
        self.logit_divisor = hidden / config["dim_model_base"]
        shape = recipe.shape(config["vocab_size"])
        self.linear_names = synthetic.linear_weight_names(layers, shape)
        gen = torch.Generator().manual_seed(recipe.seed)
        tensors = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], hidden, generator=gen) * 0.05,
                   "model.norm.weight": torch.ones(hidden)}
        for layer in range(layers):
            tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(hidden)
            tensors[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(hidden)
        for name, (rows, cols) in ((n, shape.linear_shapes(int(n.split(".")[2]))[n]) for n in self.linear_names):
            tensors[name] = torch.randn(rows, cols, generator=gen) / math.sqrt(cols)
        self.names = list(tensors)
        self.params = torch.nn.ParameterList(torch.nn.Parameter(t) for t in tensors.values())
        self._index = {name: i for i, name in enumerate(self.names)}
        cos, sin = rope_cos_sin(torch.arange(recipe.seq_len), self.head_dim, config["rope_theta"],
                                config["rope_scaling"]["short_factor"])
        self.register_buffer("cos", cos[None, :, None, :].float(), persistent=False)
        self.register_buffer("sin", sin[None, :, None, :].float(), persistent=False)

    @classmethod
    def from_exported(cls, recipe: TrainingRecipe, config: dict, weights: dict[str, torch.Tensor]) -> "QATMiniCPM":
        """The model as written (``export``'s tensors), evaluated without quantizing again: absmean
        quantization is not idempotent (a ternary x s group has absmean s x density)."""
        model = cls(recipe, config)
        with torch.no_grad():
            for name, tensor in weights.items():
                model.params[model._index[name]].copy_(tensor.float())
        model.linear_names = []
        return model

    def weight(self, name: str) -> torch.Tensor:
        w = self.params[self._index[name]]
        if name in self.linear_names:
            return fake_quantize(w, self.recipe.granularity, self.recipe.group_size)
        return w

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) of token ids (batch, seq), seq <= recipe.seq_len."""
        r, eps = self.recipe, self.config["rms_norm_eps"]
        batch, seq = ids.shape
        cos, sin = self.cos[:, :seq], self.sin[:, :seq]
        h = F.embedding(ids, self.weight("model.embed_tokens.weight")) * self.config["scale_emb"]
        for layer in range(r.num_hidden_layers):
            p = f"model.layers.{layer}"
            x = rms_norm(h, self.weight(f"{p}.input_layernorm.weight"), eps)
            q = (x @ self.weight(f"{p}.self_attn.q_proj.weight").T).view(batch, seq, -1, self.head_dim)
            k = (x @ self.weight(f"{p}.self_attn.k_proj.weight").T).view(batch, seq, -1, self.head_dim)
            v = (x @ self.weight(f"{p}.self_attn.v_proj.weight").T).view(batch, seq, -1, self.head_dim)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True)
            attn = attn.transpose(1, 2).reshape(batch, seq, -1)
            h = h + (attn @ self.weight(f"{p}.self_attn.o_proj.weight").T) * self.residual_scale
            x = rms_norm(h, self.weight(f"{p}.post_attention_layernorm.weight"), eps)
            gate = x @ self.weight(f"{p}.mlp.gate_proj.weight").T
            up = x @ self.weight(f"{p}.mlp.up_proj.weight").T
            h = h + ((F.silu(gate) * up) @ self.weight(f"{p}.mlp.down_proj.weight").T) * self.residual_scale
        h = rms_norm(h, self.weight("model.norm.weight"), eps) / self.logit_divisor
        return h @ self.weight("model.embed_tokens.weight").T

    @torch.no_grad()
    def export(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """HF-named tensors as the releases ship them: linear weights ternary x scale, exact in ``dtype``."""
        out = {}
        for name in self.names:
            w = self.params[self._index[name]].detach()
            if name in self.linear_names:
                codes, scales = ternary_quantize(w, self.recipe.granularity, self.recipe.group_size)
                w = codes * scales.to(dtype).float()  # scale rounded first: codes x scale is then exact
            out[name] = w.to(dtype).contiguous()
        return out


# --------------------------------------------------------------------------------------------
# Data


def _token_stream(tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """``<s> document </s>`` for each document, concatenated (the tokenizer adds ``<s>``)."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(list(documents)):
        ids += encoding.ids + [synthetic.EOS_TOKEN_ID]
    return torch.tensor(ids, dtype=torch.long)


def _held_out_prompts(documents: Sequence[str], count: int, words: int = 12) -> list[str]:
    """The first ``words`` words of held-out prose paragraphs: prompts the model never trained on."""
    prompts = []
    for doc in documents:
        paragraph = doc.split("\n\n")[0].split()
        if len(paragraph) >= 2 * words and paragraph[0][:1].isupper() and all(w.isascii() for w in paragraph):
            prompts.append(" ".join(paragraph[:words]))
        if len(prompts) == count:
            break
    return prompts


@torch.no_grad()
def window_losses(model: QATMiniCPM, stream: torch.Tensor, tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of each ``seq_len`` window of the first ``tokens`` of
    ``stream`` (each window scored on the tokens that follow its own), 16 windows per forward."""
    seq = model.recipe.seq_len
    usable = min(tokens, (stream.numel() - 1) // seq * seq)
    inputs = stream[:usable].view(-1, seq)
    targets = stream[1 : usable + 1].view(-1, seq)
    return torch.cat([F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(-1, seq).sum(1)
                      for x, y in zip(inputs.split(16), targets.split(16))])


def evaluate_loss(model: QATMiniCPM, stream: torch.Tensor, tokens: int) -> float:
    """Mean next-token cross-entropy (nats) over the first ``tokens`` of ``stream``, in windows."""
    losses = window_losses(model, stream, tokens)
    return float(losses.sum() / (losses.numel() * model.recipe.seq_len))


# --------------------------------------------------------------------------------------------
# Training


def _learning_rate(recipe: TrainingRecipe, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(out_dir: str | os.PathLike, recipe: TrainingRecipe = RECIPES["default"], progress: bool = True,
          threads: int | None = None) -> pathlib.Path:
    """Train, write the checkpoint directory and its training record; returns the directory."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from vllm_bitcpm.testing.offline_corpus import load_corpus

    started = time.time()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)

    corpus = load_corpus()
    tokenizer = synthetic.build_tokenizer(recipe.tokenizer_vocab, corpus.train)
    vocab_size = 64 * math.ceil(tokenizer.get_vocab_size() / 64)
    shape = recipe.shape(vocab_size)
    config = synthetic.write_model_files(out, shape, vocab_size, torch.bfloat16, tokenizer)
    train_stream = _token_stream(tokenizer, corpus.train)
    held_out_stream = _token_stream(tokenizer, corpus.held_out)

    model = QATMiniCPM(recipe, config)
    decay = [p for p in model.params if p.dim() == 2]
    no_decay = [p for p in model.params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe.learning_rate, betas=(0.9, 0.95))
    sampler = torch.Generator().manual_seed(recipe.seed + 1)
    offsets = torch.arange(recipe.seq_len + 1)
    curve, smoothed = [], None
    bar = tqdm(range(recipe.steps), desc="QAT training", unit="step", disable=not progress)
    for step in bar:
        starts = torch.randint(0, train_stream.numel() - recipe.seq_len - 1, (recipe.batch_size, 1), generator=sampler)
        window = train_stream[starts + offsets]
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(recipe, step)
        optimizer.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if step % 10 == 0 or step == recipe.steps - 1:
            curve.append([step, round(value, 4)])
            bar.set_postfix(loss=f"{smoothed:.3f}")

    weights = model.export(torch.bfloat16)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    # Evaluate what was written (bf16 weights), not the latent float ones.
    exported = QATMiniCPM.from_exported(recipe, config, weights)
    held_out_loss = evaluate_loss(exported, held_out_stream, recipe.held_out_tokens)
    train_loss = evaluate_loss(exported, train_stream, recipe.held_out_tokens)
    record = {
        "recipe": dataclasses.asdict(recipe),
        "corpus": corpus.describe(),
        "tokenizer_vocab": tokenizer.get_vocab_size(),
        "parameters": sum(p.numel() for p in model.params),
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "train_tokens": int(train_stream.numel()),
        "final_train_loss_smoothed": round(smoothed, 4),
        "train_loss": round(train_loss, 4),
        "held_out_loss": round(held_out_loss, 4),
        "held_out_perplexity": round(math.exp(held_out_loss), 3),
        "unigram_entropy_nats": round(_unigram_entropy(train_stream), 4),
        "held_out_prompts": _held_out_prompts(corpus.held_out, recipe.held_out_prompts),
        "loss_curve": curve,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.time() - started, 1),
    }
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _unigram_entropy(stream: torch.Tensor) -> float:
    """Cross-entropy of a model that knows only token frequencies: what 'untrained' would score."""
    counts = torch.bincount(stream).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


def read_record(path: str | os.PathLike) -> dict | None:
    """The training record of a trained checkpoint, or None for any other checkpoint."""
    record = pathlib.Path(path) / TRAINING_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def ensure_trained(path: str | os.PathLike = DEFAULT_CHECKPOINT, recipe: TrainingRecipe = RECIPES["default"],
                   progress: bool = True, threads: int | None = None) -> pathlib.Path:
    """``path`` if it holds a model trained with ``recipe``, else train it there (cached, never committed)."""
    record = read_record(path)
    if record is not None and record["recipe"] == dataclasses.asdict(recipe) \
            and (pathlib.Path(path) / "model.safetensors").is_file():
        return pathlib.Path(path)
    if progress:
        print(f"training the QAT BitCPM model into {path} (python -m vllm_bitcpm.testing.qat_training)", flush=True)
    return train(path, recipe, progress=progress, threads=threads)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, help="override the recipe's steps")
    parser.add_argument("--granularity", choices=["per_row", "per_group"], help="override the recipe's")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    overrides = {k: v for k, v in (("steps", args.steps), ("granularity", args.granularity)) if v is not None}
    recipe = dataclasses.replace(recipe, **overrides)
    out = train(args.out_dir, recipe, threads=args.threads)
    record = read_record(out)
    print(f"{out}: held-out loss {record['held_out_loss']:.3f} nats (perplexity {record['held_out_perplexity']:.1f}), "
          f"train loss {record['train_loss']:.3f}, unigram baseline {record['unigram_entropy_nats']:.3f}; "
          f"{record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
