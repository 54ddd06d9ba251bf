"""Write the seed inputs of fuzz_checkpoint.py: small valid packed bitcpm safetensors files.

    .venv/bin/python tests/fuzz/make_corpus.py /tmp/corpus     # -> /tmp/corpus/*.safetensors

Generated when needed (the repository holds no weight files outside vllm_bitcpm/data).
Packed by the package's own quantizer (ternary.quantize_exact) from seeded random ternary
weights: one packed layer per-row, one with groups of 64, one dense linear weight beside them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_bitcpm import packed_checkpoint as pc
from vllm_bitcpm import ternary

def packed(rows: int, cols: int, group: int | None, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (rows, cols), generator=gen)
    groups = 1 if group is None else cols // group
    scales = (torch.rand(rows, groups, generator=gen) * 0.05 + 0.01).to(torch.bfloat16).float()
    weight = (trits * scales.repeat_interleave(cols // groups, dim=1)).to(torch.bfloat16)
    matrix, _ = ternary.quantize_exact(weight)
    if group is not None:
        assert matrix.group_size == group
    return {"codes": matrix.codes, "scales": matrix.scales.to(torch.bfloat16)}


def write_corpus(corpus: Path) -> list[Path]:
    corpus.mkdir(parents=True, exist_ok=True)
    q = packed(4, 128, 64, 0)
    o = packed(2, 128, None, 1)
    layer = "model.layers.0"
    files = {
        "grouped.safetensors": {f"{layer}.self_attn.q_proj" + pc.CODES_SUFFIX: q["codes"],
                                f"{layer}.self_attn.q_proj" + pc.SCALES_SUFFIX: q["scales"]},
        "mixed.safetensors": {f"{layer}.self_attn.q_proj" + pc.CODES_SUFFIX: q["codes"],
                              f"{layer}.self_attn.q_proj" + pc.SCALES_SUFFIX: q["scales"],
                              f"{layer}.self_attn.o_proj" + pc.CODES_SUFFIX: o["codes"],
                              f"{layer}.self_attn.o_proj" + pc.SCALES_SUFFIX: o["scales"].repeat(1, 2),
                              f"{layer}.mlp.down_proj.weight": torch.zeros(2, 8, dtype=torch.bfloat16),
                              f"{layer}.input_layernorm.weight": torch.ones(8, dtype=torch.bfloat16)},
    }
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(corpus / name), metadata={"format": "pt"})
    return [corpus / name for name in files]


def main() -> None:
    for path in write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")):
        print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
