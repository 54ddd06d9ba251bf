"""A transformers config class for ``model_type: "minicpm"``.

transformers has no built-in MiniCPM (1/2/4) config: hub checkpoints ship
``configuration_minicpm.py`` behind ``auto_map`` and need ``trust_remote_code``. Registering
this class lets vLLM load local and hub BitCPM4/MiniCPM4 checkpoints without remote code. The
fields are the architecture's: muP scalings (``scale_emb``, ``scale_depth``, ``dim_model_base``)
and RoPE parameters, where a legacy ``rope_scaling`` of type ``longrope`` (as BitCPM4 ships
it) is converted by transformers into ``rope_parameters``, which vLLM's ``get_rope`` reads.
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig

MODEL_TYPE = "minicpm"


class MiniCPMConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 73448,
        hidden_size: int = 1024,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.1,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = True,
        rope_theta: float = 10000.0,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        scale_emb: float = 1.0,
        scale_depth: float | None = None,
        dim_model_base: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (
            num_attention_heads if num_key_value_heads is None else num_key_value_heads
        )
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_parameters = rope_parameters
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.scale_emb = scale_emb
        # Without muP fields the scalings are no-ops (as MiniCPM's own config defines them).
        self.scale_depth = math.sqrt(num_hidden_layers) if scale_depth is None else scale_depth
        self.dim_model_base = hidden_size if dim_model_base is None else dim_model_base
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def register_config() -> None:
    """Make ``AutoConfig`` resolve ``model_type: "minicpm"`` to :class:`MiniCPMConfig` (idempotent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE in CONFIG_MAPPING:
        return
    AutoConfig.register(MODEL_TYPE, MiniCPMConfig)
