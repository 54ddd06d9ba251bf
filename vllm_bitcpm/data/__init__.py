"""A real ternary model that ships with the package, so a fresh install writes readable text.

``bitcpm-tiny/`` is a 4-layer MiniCPM (hidden 256, ~4 M parameters) trained the way BitCPM is
trained (ternary QAT, absmean scales per group of 64) on the English documentation that ships with
CPython, then packed by ``vllm-bitcpm convert`` (2-bit codes + bf16 scales; the embedding stays
bf16). Its ``bitcpm_training.json`` records the recipe, the corpus hash and the held-out
perplexity; ``held_out_tokens.json`` holds the held-out token ids that perplexity is measured on,
so tests can re-score the shipped file anywhere (tests/test_shipped_model.py).

    vllm serve "$(vllm-bitcpm tiny-model)" --served-model-name bitcpm-tiny
    python -m vllm_bitcpm.demo                 # LLM(...) on it

It is small enough to start in seconds on a laptop CPU and trained enough to write
Python-docs-like English; it is not a useful assistant. Rebuilt with
``python -m vllm_bitcpm.testing.tiny_model_data`` (seeded training, about 15 minutes on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HELD_OUT_TOKENS", "TINY_MODEL", "tiny_model_path"]

#: The packed checkpoint directory (config, tokenizer, model.safetensors, training record).
TINY_MODEL = Path(__file__).resolve().parent / "bitcpm-tiny"
#: Held-out token ids and the perplexity the record states for them (not a weight file).
HELD_OUT_TOKENS = "held_out_tokens.json"


def tiny_model_path() -> str:
    """The shipped model's directory, or a clear error naming what is missing (a partial install)."""
    weights = TINY_MODEL / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"the packaged tiny model is missing {weights}: the install left out "
                                "vllm_bitcpm/data (reinstall the package, or rebuild the model with "
                                "`python -m vllm_bitcpm.testing.tiny_model_data`)")
    return str(TINY_MODEL)
