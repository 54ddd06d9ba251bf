"""Model shapes (toy and the published BitCPM / MiniCPM family) and the config.json they imply.

Its own module because the shape is what everything else keys on: the weight generator sizes
its tensors from it, the writers turn it into ``config.json``, and the family tests and
benchmarks pick presets from ``SHAPES``. The muP constants of the config live here too, and
the weight generator scales its magnitudes with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from vllm_bitcpm.testing.synthetic.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID

#: Architectures the writer knows: (config "architectures" entry, "model_type").
ARCHITECTURES = {
    "minicpm": ("MiniCPMForCausalLM", "minicpm"),
    "minicpm3": ("MiniCPM3ForCausalLM", "minicpm3"),  # MLA attention; config built into transformers
    "llama": ("LlamaForCausalLM", "llama"),  # the BitCPM-CANN-1B/3B releases
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The size fields of a MiniCPM / MiniCPM3 / Llama config.

    ``vocab_size=None`` means "the tokenizer's size rounded up to a multiple
    of 64". vLLM's MiniCPM derives ``head_dim`` as ``hidden_size //
    num_attention_heads``, so for it the hidden size must divide evenly;
    Llama checkpoints may set ``head_dim`` explicitly (``explicit_head_dim``).
    MiniCPM3 (``architecture="minicpm3"``) uses multi-head latent attention:
    ``q_lora_rank``, ``kv_lora_rank``, ``qk_nope_head_dim``,
    ``qk_rope_head_dim`` and ``v_head_dim`` replace q/k/v (every head is its
    own KV head, as in vLLM's MiniCPM3, which expands the latent to full heads).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int | None = None
    max_position_embeddings: int = 32768
    architecture: str = "minicpm"
    tie_word_embeddings: bool = True
    explicit_head_dim: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {self.architecture!r}")
        mla = (self.q_lora_rank, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim)
        if (self.architecture == "minicpm3") != all(v is not None for v in mla):
            raise ValueError("minicpm3 shapes need all MLA dims (q_lora_rank, kv_lora_rank, "
                             "qk_nope_head_dim, qk_rope_head_dim, v_head_dim); other shapes none")
        if self.explicit_head_dim is not None and self.architecture != "llama":
            raise ValueError("only llama shapes may set head_dim explicitly")
        if self.explicit_head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope_dim % 2:
            raise ValueError("the rotary dimension must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Per-head q/k width (MiniCPM3: ``qk_nope_head_dim + qk_rope_head_dim``)."""
        if self.architecture == "minicpm3":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates (MiniCPM3: only ``qk_rope_head_dim``)."""
        return self.qk_rope_head_dim if self.architecture == "minicpm3" else self.head_dim

    def linear_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """HF weight name -> (out_features, in_features) of one decoder layer's linear weights."""
        p = f"model.layers.{layer}"
        hidden, inter = self.hidden_size, self.intermediate_size
        if self.architecture == "minicpm3":
            heads = self.num_attention_heads
            attn = {
                "q_a_proj": (self.q_lora_rank, hidden),
                "q_b_proj": (heads * self.head_dim, self.q_lora_rank),
                "kv_a_proj_with_mqa": (self.kv_lora_rank + self.qk_rope_head_dim, hidden),
                "kv_b_proj": (heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank),
                "o_proj": (hidden, heads * self.v_head_dim),
            }
        else:
            q_rows = self.num_attention_heads * self.head_dim
            kv_rows = self.num_key_value_heads * self.head_dim
            attn = {"q_proj": (q_rows, hidden), "k_proj": (kv_rows, hidden),
                    "v_proj": (kv_rows, hidden), "o_proj": (hidden, q_rows)}
        mlp = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        return {
            **{f"{p}.self_attn.{n}.weight": s for n, s in attn.items()},
            **{f"{p}.mlp.{n}.weight": s for n, s in mlp.items()},
        }


SHAPES: dict[str, ModelShape] = {
    # Four layers (not two) so that the residual scale 1.4/sqrt(L) = 0.7 is
    # far enough from 1 for a missing scale to be detectable.
    "tiny": ModelShape(128, 256, 4, 4, 2),
    # Every in_features (192 and 200) is not a multiple of 128.
    "tiny-odd": ModelShape(192, 200, 2, 6, 2),
    "small": ModelShape(256, 512, 4, 8, 2),
    # MiniCPM3's MLA at toy size (openbmb/MiniCPM3-4B: q_lora 768, kv_lora 256, nope 64, rope 32,
    # v 64); head_dim nope + rope = 32 is one the CPU attention backend supports (24 is not).
    # Four layers: with two, every prompt predicts the same token.
    "tiny-minicpm3": ModelShape(128, 256, 4, 4, 4, architecture="minicpm3", q_lora_rank=64,
                                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32),
    # A toy Llama (the BitCPM-CANN-1B/3B architecture): explicit head_dim, untied lm_head.
    "tiny-llama": ModelShape(128, 256, 2, 4, 2, architecture="llama", tie_word_embeddings=False,
                             explicit_head_dim=64),
    # openbmb/BitCPM4-0.5B (same shape as MiniCPM4-0.5B): ~434M parameters.
    "bitcpm4-0.5b": ModelShape(1024, 4096, 24, 16, 2, vocab_size=73448),
    # openbmb/BitCPM4-1B: derived, not read from its config.json. The published bf16 file is
    # 2.72 GB = 1.36B parameters; with MiniCPM4-1B's layout (hidden 1536, 24 heads of 64,
    # 8 KV heads, intermediate 3840, vocab 73448, tied) one layer holds
    # 2*1536^2 (q, o) + 2*1536*512 (k, v) + 3*1536*3840 (mlp) = 23.99M parameters, and
    # 52 layers + the 112.8M embedding = 1.360B, i.e. 2.72 GB in bf16.
    "bitcpm4-1b": ModelShape(1536, 3840, 52, 24, 8, vocab_size=73448),
    # openbmb/MiniCPM3-4B's published config (MLA). No ternary MiniCPM3 is released; this is
    # the shape a BitCPM3 would have.
    "minicpm3-4b": ModelShape(2560, 6400, 62, 40, 40, vocab_size=73448, architecture="minicpm3",
                              q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=64,
                              qk_rope_head_dim=32, v_head_dim=64),
    # BitCPM-CANN releases (pytorch_model.bin, group-wise scales along input columns). Only
    # partly verified; see UNVERIFIED_SHAPES.
    "bitcpm-cann-0.5b": ModelShape(1024, 4096, 24, 16, 2, vocab_size=73448),
    "bitcpm-cann-1b": ModelShape(2048, 6144, 28, 16, 2, vocab_size=73448, architecture="llama",
                                 tie_word_embeddings=False, explicit_head_dim=128),
    "bitcpm-cann-3b": ModelShape(2560, 10240, 32, 32, 2, vocab_size=73448, architecture="llama",
                                 tie_word_embeddings=False, explicit_head_dim=128),
    "bitcpm-cann-8b": ModelShape(4096, 16384, 32, 32, 2, vocab_size=73448),
}

#: Published BitCPM / MiniCPM shapes, as opposed to the toy ones.
FAMILY_SHAPES = ("bitcpm4-0.5b", "bitcpm4-1b", "minicpm3-4b", "bitcpm-cann-0.5b", "bitcpm-cann-1b",
                 "bitcpm-cann-3b", "bitcpm-cann-8b")

#: Family shapes not read from the released config.json (what is uncertain about each).
UNVERIFIED_SHAPES = {
    "bitcpm4-1b": "derived from the 2.72 GB file size with MiniCPM4-1B's layout",
    "bitcpm-cann-0.5b": "hidden 1024 / 24 layers reported; heads (16/2), intermediate (4096) assumed",
    "bitcpm-cann-1b": "reported as LlamaForCausalLM; vocab assumed 73448",
    "bitcpm-cann-3b": "head_dim 128 reported explicit; vocab assumed 73448",
    "bitcpm-cann-8b": "reported; vocab assumed 73448",
}


def resolve_shape(shape: str | ModelShape | Mapping[str, int]) -> ModelShape:
    """Accept a shape name, a ``ModelShape`` or a dict of its fields."""
    if isinstance(shape, ModelShape):
        return shape
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
        return SHAPES[shape]
    return ModelShape(**dict(shape))


def linear_weight_names(num_hidden_layers: int, shape: ModelShape | None = None) -> list[str]:
    """HF names of the linear (ternary) weights, in checkpoint order (MiniCPM layout by default)."""
    shape = shape or SHAPES["tiny"]
    return [name for layer in range(num_hidden_layers) for name in shape.linear_shapes(layer)]


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}

SCALE_EMB = 12
SCALE_DEPTH = 1.4
DIM_MODEL_BASE = 256
ROPE_THETA = 10000.0


def longrope_factors(head_dim: int) -> tuple[list[float], list[float]]:
    """(short, long) LongRoPE factors, clearly different from 1 and each other.

    Short factors rise to 3.0 and long factors from 1.5 to 6.0, so ignoring
    either set, or using the wrong one, rescales every rotary frequency.
    """
    half = head_dim // 2
    steps = [i / max(half - 1, 1) for i in range(half)]
    short = [round(1.0 + 2.0 * s, 4) for s in steps]
    long = [round(1.5 + 4.5 * s * s, 4) for s in steps]
    # The first pair rotates fastest and matters most on short prompts; keep it away from 1.
    short[0] = 1.75
    return short, long


def hf_config(
    shape: ModelShape,
    vocab_size: int,
    dtype: torch.dtype,
    original_max_position_embeddings: int,
) -> dict:
    """The ``config.json`` of a checkpoint of ``shape`` (MiniCPM, MiniCPM3 or Llama keys)."""
    short, long = longrope_factors(shape.rope_dim)
    architecture, model_type = ARCHITECTURES[shape.architecture]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": ROPE_THETA,
        "rope_scaling": {
            "rope_type": "longrope",
            "long_factor": long,
            "short_factor": short,
            "original_max_position_embeddings": original_max_position_embeddings,
        },
        "scale_emb": SCALE_EMB,
        "scale_depth": SCALE_DEPTH,
        "dim_model_base": DIM_MODEL_BASE,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "initializer_range": 0.1,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if shape.architecture == "minicpm3":
        config.update(
            q_lora_rank=shape.q_lora_rank, kv_lora_rank=shape.kv_lora_rank,
            qk_nope_head_dim=shape.qk_nope_head_dim, qk_rope_head_dim=shape.qk_rope_head_dim,
            v_head_dim=shape.v_head_dim,
        )
    elif shape.architecture == "llama":
        # Plain Llama: no muP scalings, plain RoPE.
        for key in ("rope_scaling", "scale_emb", "scale_depth", "dim_model_base"):
            del config[key]
        config.update(head_dim=shape.head_dim, attention_bias=False, mlp_bias=False)
    return config
