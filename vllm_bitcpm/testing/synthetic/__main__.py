"""The command line: ``python -m vllm_bitcpm.testing.synthetic OUT_DIR [--shape ...]``.

Its own module so that ``python -m`` runs the package (writing one checkpoint from a shell or
a script) while importing the package stays free of argument parsing.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import torch

from vllm_bitcpm.testing import synthetic
from vllm_bitcpm.testing.synthetic import (
    DEFAULT_SHARD_BYTES,
    GRANULARITIES,
    SHAPES,
    resolve_shape,
    write_checkpoint,
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_bitcpm.testing.synthetic",
                                     description=synthetic.__doc__.split("\n\n")[0])
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
    main()
