"""Synthetic BitCPM4 / MiniCPM checkpoints for tests, demos and benchmarks.

The real BitCPM4 weights cannot be downloaded here, so this module writes a
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

CLI::

    python -m vllm_bitcpm.synthetic OUT_DIR --shape tiny --granularity per_row
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

__all__ = [
    "GRANULARITIES",
    "REPORT_PROMPTS",
    "SHAPES",
    "TEST_PROMPTS",
    "ModelShape",
    "build_tokenizer",
    "default_tokenizer",
    "linear_weight_names",
    "resolve_shape",
    "write_checkpoint",
    "write_model_files",
]

GRANULARITIES = ("per_tensor", "per_row", "per_group", "dense")

# The prompts of the published accuracy report.
REPORT_PROMPTS: list[str] = [
    "The capital of France is",
    "Einstein is known for",
    "Quantum computing is",
    "The meaning of life is",
    "Machine learning is a",
    "Python is a programming",
    "Natural language processing",
]

# More varied prompts so that tests do not depend on the report's seven.
TEST_PROMPTS: list[str] = [
    "The weather today is cold and",
    "A good teacher always helps students to",
    "The river flows slowly through the old town",
    "In the morning the farmer walks to the field and",
    "Scientists study the stars because",
    "My favourite book tells the story of a",
    "The train to the city leaves at",
    "Computers store information in memory and",
    "Music can make people feel happy when",
    "The small cat sat near the window and watched the",
]


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


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
# Tokenizer
# ---------------------------------------------------------------------------

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN_ID, EOS_TOKEN_ID = 1, 2
TOKENIZER_VOCAB_TARGET = 1024
#: Largest safetensors shard write_checkpoint writes (the 3B and 8B shapes come in several).
DEFAULT_SHARD_BYTES = 4 * 1024**3

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The capital of France is Paris, a city on the river Seine.
Paris is famous for its museums, its cafes and its long history.
The capital of Germany is Berlin and the capital of Italy is Rome.
The capital of Spain is Madrid, and the capital of Japan is Tokyo.
Every country has a capital city where the government meets.
Einstein is known for the theory of relativity.
Einstein is known for his work on light, energy and gravity.
Albert Einstein was a physicist who changed how we think about space and time.
Newton is known for the laws of motion and the theory of gravity.
Marie Curie is known for her research on radioactivity.
Quantum computing is a way of computing that uses quantum bits.
Quantum computing is based on superposition and entanglement.
A quantum computer can solve some problems faster than a classical computer.
Quantum mechanics describes the behaviour of very small particles.
The meaning of life is a question that philosophers have asked for centuries.
The meaning of life is different for every person.
Some people say the meaning of life is to love, to learn and to help others.
Others believe the meaning of life is to find happiness and peace.
Machine learning is a field of computer science that learns from data.
Machine learning is a method for building models from examples.
A machine learning model finds patterns in data and makes predictions.
Deep learning is a kind of machine learning that uses neural networks.
A neural network is made of layers of simple units called neurons.
Python is a programming language that is easy to read and write.
Python is a programming language used for science, web sites and data analysis.
Many programmers like Python because its code is short and clear.
Natural language processing is the study of how computers understand human language.
Natural language processing helps computers translate, summarize and answer questions.
Natural language processing uses machine learning to model words and sentences.
A language model predicts the next word in a sentence.
The weather today is cold and windy, so wear a warm coat.
The weather in summer is hot and the days are long.
In winter the nights are long and the weather is often cold.
Rain falls from the clouds and fills the rivers and lakes.
A good teacher always helps students to learn and to ask questions.
Students go to school to learn reading, writing and mathematics.
The teacher wrote the answer on the board and the students copied it.
The river flows slowly through the old town and under the stone bridge.
The old town has narrow streets, small shops and a large church.
In the morning the farmer walks to the field and feeds the animals.
The farmer grows wheat, corn and potatoes on his land.
Cows give milk, hens lay eggs and sheep give wool.
Scientists study the stars because they want to understand the universe.
The sun is a star and the earth is a planet that moves around it.
The moon moves around the earth once every month.
Light from distant stars takes many years to reach us.
My favourite book tells the story of a young girl who travels around the world.
She meets many people and learns about their lives and their languages.
The story ends when she returns home and writes a book about her journey.
The train to the city leaves at eight o'clock in the morning.
The bus is slower than the train but it is cheaper.
People travel by car, by train, by plane and by ship.
Computers store information in memory and on disks.
A computer program is a list of instructions for the machine.
The processor reads instructions from memory and executes them one by one.
Software engineers write code, test it and fix the bugs they find.
Music can make people feel happy when they are sad.
Music is made of rhythm, melody and harmony.
Many people learn to play the piano or the guitar when they are young.
The small cat sat near the window and watched the birds in the garden.
The dog ran across the park and jumped into the water.
Birds build nests in the trees and sing in the early morning.
The children played in the garden until the sun went down.
Water boils at one hundred degrees and freezes at zero degrees.
Plants need water, light and air to grow.
Trees produce oxygen and give shade on hot days.
The ocean covers most of the surface of the earth.
Mountains are high and cold, and some of them are covered with snow.
The history of the world is full of wars, discoveries and inventions.
The printing press made books cheaper and helped ideas to spread.
The internet connects computers all over the world.
People use phones to call their friends and to read the news.
A healthy diet includes fruit, vegetables, bread and fish.
Doctors help people who are sick and nurses take care of them in hospitals.
Exercise makes the body strong and the mind clear.
Sleep is important for health and for memory.
The market opens early and sells fresh bread, cheese and fruit.
Money is used to buy food, clothes and houses.
A bank keeps money safe and lends it to people and companies.
The economy grows when people work, trade and invest.
Mathematics is the language of science and engineering.
Numbers can be added, subtracted, multiplied and divided.
A triangle has three sides and a square has four sides.
Energy cannot be created or destroyed, only changed from one form to another.
Electricity flows through wires and powers lights and machines.
The engine of a car burns fuel to produce motion.
Art helps people express feelings that are hard to put into words.
The painter used bright colours to show the light of the morning.
Writers use words to tell stories, share ideas and describe the world.
A library is a quiet place full of books and readers.
Language allows people to share knowledge across generations.
Translation turns words in one language into words in another language.
Questions lead to answers, and answers lead to new questions.
The best way to learn is to practice every day.
Good friends listen, help and tell the truth.
A city needs clean water, safe roads and good schools.
The government makes laws and the courts decide if they are broken.
Freedom, justice and peace are important values for many people.
The user asked a question and the assistant gave a helpful answer.
The assistant explains ideas clearly and politely.
Thank you for your question, here is a short answer.
Hello, how are you today? I am fine, thank you.
"""

_TEMPLATE_SUBJECTS = [
    "The student", "The scientist", "The engineer", "A young writer", "The old farmer",
    "The doctor", "My friend", "The teacher", "The computer", "The model",
]
_TEMPLATE_PREDICATES = [
    "reads a book about history every evening.",
    "writes code in Python to analyse the data.",
    "explains how machine learning works.",
    "studies the theory of relativity and quantum mechanics.",
    "travels to the capital to meet the government.",
    "learns a new language by reading stories.",
    "asks a question about the meaning of life.",
    "builds a small program that predicts the weather.",
]


def _training_lines() -> list[str]:
    """The embedded corpus plus subject/predicate combinations of it."""
    lines = _CORPUS.splitlines()
    lines += [f"{s} {p}" for s in _TEMPLATE_SUBJECTS for p in _TEMPLATE_PREDICATES]
    return lines


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_TARGET, lines: Iterable[str] | None = None):
    """Train the byte-level BPE tokenizer on ``lines`` (default: the embedded corpus); deterministic.

    Prepends ``<s>`` like the real MiniCPM tokenizer does, so prompts served
    by vLLM start with BOS. Well under a second on the embedded corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_lines() if lines is None else lines, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", BOS_TOKEN_ID)],
    )
    for token_id, token in enumerate(SPECIAL_TOKENS[:3]):
        assert tokenizer.token_to_id(token) == token_id, token
    return tokenizer


@functools.lru_cache(maxsize=1)
def _default_tokenizer_json() -> str:
    """The default tokenizer, trained once per process (it is deterministic, and every synthetic
    checkpoint a test session or benchmark writes uses it)."""
    return build_tokenizer().to_str()


def default_tokenizer():
    """A fresh copy of :func:`build_tokenizer`'s default result, without training it again."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_default_tokenizer_json())


def _write_tokenizer_files(out_dir: pathlib.Path, tokenizer) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out_dir / "special_tokens_map.json",
        {**special, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
    )


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}

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


def _config(
    shape: ModelShape,
    vocab_size: int,
    dtype: torch.dtype,
    original_max_position_embeddings: int,
) -> dict:
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


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

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
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    make: Callable[[torch.Generator], torch.Tensor]


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


def _tensor_specs(
    shape: ModelShape,
    vocab_size: int,
    tokenizer_size: int,
    granularity: str,
    group_size: int,
    dtype: torch.dtype,
    non_ternary_layers: Sequence[str],
) -> list[_TensorSpec]:
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

    def linear(name: str, rows: int, cols: int, gain: float, row_gains=None) -> _TensorSpec:
        kind = "dense" if name in non_ternary_layers else granularity
        return _TensorSpec(
            name, (rows, cols),
            lambda gen: _linear_weight(gen, rows, cols, gain, kind, group_size, dtype, row_gains),
        )

    def norm(name: str, width: int = hidden) -> _TensorSpec:
        return _TensorSpec(
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

    def attention(p: str, sizes: dict[str, tuple[int, int]]) -> list[_TensorSpec]:
        def proj(name: str, gain: float, row_gains=None) -> _TensorSpec:
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

    specs = [_TensorSpec("model.embed_tokens.weight", (vocab_size, hidden), embedding)]
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
        specs.append(_TensorSpec("lm_head.weight", (vocab_size, hidden), head))
    return specs


def _write_safetensors(
    path: pathlib.Path, specs: list[_TensorSpec], dtype: torch.dtype, seed: int,
    progress: bool,
) -> None:
    """Stream tensors to one safetensors file, holding only one in memory.

    ``safetensors.torch.save_file`` needs the whole state dict in memory
    (~3.5 GB for the 1B shape in float32); the format is simple enough to
    write incrementally: little-endian u64 header size, JSON header, raw data.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * itemsize
        header[spec.name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    iterator: Iterable[_TensorSpec] = specs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(specs, desc=f"writing {path.name}", unit="tensor")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in iterator:
            tensor = spec.make(_generator(seed, spec.name))
            assert tuple(tensor.shape) == spec.shape and tensor.dtype == dtype, spec.name
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def _write_shards(out: pathlib.Path, specs: list[_TensorSpec], dtype: torch.dtype, seed: int, progress: bool,
                  shard_bytes: int) -> None:
    """``model.safetensors``, or shards of at most ``shard_bytes`` and their index."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[_TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", specs, dtype, seed, progress)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / name, shard, dtype, seed, progress)
        weight_map.update({spec.name: name for spec in shard})
    total = sum(math.prod(spec.shape) for spec in specs) * itemsize
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def _write_remote_config_code(out: pathlib.Path, config: dict) -> None:
    """Ship the config class as remote code, as hub BitCPM4 checkpoints do (``auto_map``).

    Stock vLLM (plugin disabled) can then load the checkpoint with ``trust_remote_code``,
    which is how tests run it beside the plugin; with the plugin, the registered class is used.
    """
    from vllm_bitcpm import config as config_module

    (out / "configuration_minicpm.py").write_text(pathlib.Path(config_module.__file__).read_text())
    config["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMConfig"}


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_checkpoint(
    out_dir: str | pathlib.Path,
    shape: str | ModelShape | Mapping[str, int] = "tiny",
    granularity: str = "per_row",
    group_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    non_ternary_layers: Sequence[str] = (),
    original_max_position_embeddings: int = 32768,
    overwrite: bool = False,
    progress: bool | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> pathlib.Path:
    """Write a synthetic BitCPM4 checkpoint directory and return its path.

    Weights are generated and written one tensor at a time, in safetensors shards of at most
    ``shard_bytes`` (HF's ``model-0000i-of-0000n.safetensors`` plus index, as big releases ship),
    so an 8B checkpoint never has to fit in memory.

    The shape's ``architecture`` picks MiniCPM (default), MiniCPM3 (MLA) or Llama tensors
    and config.
    ``granularity`` is how ternary scales are shared: ``per_tensor``,
    ``per_row`` (per output row), ``per_group`` (per ``group_size``
    consecutive input columns of a row; the last group may be partial) or
    ``dense`` (ordinary non-ternary weights, i.e. a regular MiniCPM); the embedding, the
    norms and an untied ``lm_head`` are never ternary.
    ``non_ternary_layers`` lists HF weight names to write dense regardless.
    Lowering ``original_max_position_embeddings`` below
    ``max_position_embeddings`` (32768) makes long contexts use the LongRoPE
    long factors and an attention factor > 1. Deterministic for a given seed.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if group_size < 1:
        raise ValueError("group_size must be positive")
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}")
    model_shape = resolve_shape(shape)
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = default_tokenizer()
    tokenizer_size = tokenizer.get_vocab_size()
    vocab_size = model_shape.vocab_size or 64 * math.ceil(tokenizer_size / 64)
    if vocab_size < tokenizer_size:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {tokenizer_size}")

    specs = _tensor_specs(
        model_shape, vocab_size, tokenizer_size, granularity, group_size, dtype,
        non_ternary_layers,
    )
    if progress is None:
        progress = model_shape.hidden_size >= 1024
    _write_shards(out, specs, dtype, seed, progress, shard_bytes)
    write_model_files(out, model_shape, vocab_size, dtype, tokenizer, original_max_position_embeddings)
    return out


def write_model_files(
    out: pathlib.Path, shape: ModelShape, vocab_size: int, dtype: torch.dtype, tokenizer,
    original_max_position_embeddings: int = 32768,
) -> dict:
    """Everything of a checkpoint directory but its weights: config, remote config code, tokenizer.

    Shared with ``vllm_bitcpm.testing.qat_training``, whose trained checkpoints must look
    exactly like these. Returns the config written.
    """
    config = _config(shape, vocab_size, dtype, original_max_position_embeddings)
    if shape.architecture == "minicpm":  # minicpm3 and llama configs are built into transformers
        _write_remote_config_code(out, config)
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID},
    )
    _write_tokenizer_files(out, tokenizer)
    return config


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--granularity", default="per_row", choices=GRANULARITIES)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--non-ternary-layer", action="append", default=[],
                        help="HF weight name to write dense (repeatable)")
    parser.add_argument("--original-max-position-embeddings", type=int, default=32768)
    parser.add_argument("--intermediate-size", type=int,
                        help="override the shape's intermediate size (e.g. 200)")
    parser.add_argument("--shard-gib", type=float, default=DEFAULT_SHARD_BYTES / 2**30,
                        help="largest safetensors shard (GiB)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    shape = resolve_shape(args.shape)
    if args.intermediate_size:
        shape = dataclasses.replace(shape, intermediate_size=args.intermediate_size)
    path = write_checkpoint(
        args.out_dir, shape=shape, granularity=args.granularity,
        group_size=args.group_size, dtype=getattr(torch, args.dtype), seed=args.seed,
        non_ternary_layers=args.non_ternary_layer,
        original_max_position_embeddings=args.original_max_position_embeddings,
        overwrite=args.overwrite, shard_bytes=int(args.shard_gib * 2**30),
    )
    print(path)


if __name__ == "__main__":
    _main()
