"""Synthetic BitCPM4 / MiniCPM checkpoints for tests, demos and benchmarks.

The real BitCPM4 weights cannot be downloaded here, so this package writes a
HuggingFace-style checkpoint directory with the same layout: a ``minicpm``
``config.json`` with LongRoPE scaling, ``model.safetensors`` whose linear
weights are fake-quantized ternary (``W = T * S``, ``T`` in {-1, 0, 1}), and a
small byte-level BPE tokenizer trained on an embedded English corpus.

The weights are random, but not arbitrary: their magnitudes are chosen so that
every architectural component moves the next-token distribution. Attention is
sharp (large query/key scales), and the attention and MLP branches are about as
large as the muP-scaled embedding, so a wrong RoPE base, ignored LongRoPE
factors, a missing residual scale or a missing causal mask all change top-1
predictions (see ``tests/test_reference_model.py``).

Shapes of the published models are reproduced for benchmarking and the
family tests (MiniCPM, MiniCPM3 with MLA, and the Llama-architecture
BitCPM-CANN releases); those not read from a released config are listed in
``UNVERIFIED_SHAPES``.

The package is split by concern: ``shapes`` (presets and the config.json they imply),
``tokenizer`` (tokenizer, corpus, prompts), ``weights`` (the random ternary weights) and
``writers`` (the checkpoint directory on disk); this module re-exports what callers use.

CLI::

    python -m vllm_bitcpm.testing.synthetic OUT_DIR --shape tiny --granularity per_row
"""

from vllm_bitcpm.testing.synthetic.shapes import (
    ARCHITECTURES,
    FAMILY_SHAPES,
    SHAPES,
    UNVERIFIED_SHAPES,
    ModelShape,
    linear_weight_names,
    resolve_shape,
)
from vllm_bitcpm.testing.synthetic.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    REPORT_PROMPTS,
    TEST_PROMPTS,
    build_tokenizer,
    default_tokenizer,
)
from vllm_bitcpm.testing.synthetic.weights import GRANULARITIES
from vllm_bitcpm.testing.synthetic.writers import DEFAULT_SHARD_BYTES, write_checkpoint, write_model_files

__all__ = [
    "ARCHITECTURES",
    "BOS_TOKEN_ID",
    "DEFAULT_SHARD_BYTES",
    "EOS_TOKEN_ID",
    "FAMILY_SHAPES",
    "GRANULARITIES",
    "REPORT_PROMPTS",
    "SHAPES",
    "TEST_PROMPTS",
    "UNVERIFIED_SHAPES",
    "ModelShape",
    "build_tokenizer",
    "default_tokenizer",
    "linear_weight_names",
    "resolve_shape",
    "write_checkpoint",
    "write_model_files",
]
