"""``vllm-bitcpm``: inspect a BitCPM checkpoint, or convert it to a packed 2-bit checkpoint.

    vllm-bitcpm inspect SRC          # per linear layer: ternary?, scale layout, zeros, bytes (any checkpoint,
                                     # fake-quantized or converted)
    vllm-bitcpm convert SRC DST      # write a packed checkpoint that `vllm serve DST` loads
    vllm-bitcpm convert SRC DST --format gptq   # 4-bit GPTQ: served without this plugin
    vllm-bitcpm tiny-model           # path of the small trained ternary model that ships with the package:
                                     # vllm serve "$(vllm-bitcpm tiny-model)"

SRC is a local checkpoint directory or a hub id. Errors name the file or tensor and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from vllm_bitcpm import packed_checkpoint as pc

_MIB = 2**20


def _describe_quantized(config: dict) -> None:
    """The header of a converted checkpoint: what `convert` recorded in quantization_config."""
    method = config.get("quant_method")
    if method == "bitcpm":
        print(f"packed bitcpm checkpoint: layout version {config.get('layout_version')}, {config.get('bits')} bits per "
              f"weight + scales, group_size {config.get('group_size')} (-1: one scale per row), source granularity "
              f"{config.get('granularity')}, kept dense: {config.get('modules_to_not_convert') or 'none'}\n")
    else:
        print(f"{method} checkpoint: {config.get('bits')} bits, group_size {config.get('group_size')}, "
              f"sym {config.get('sym')}, desc_act {config.get('desc_act')}"
              + (f", from ternary weights ({config['meta'].get('ternary_granularity')})"
                 if isinstance(config.get("meta"), dict) and "ternary_granularity" in config["meta"] else "") + "\n")


def _inspect(args) -> int:
    source = pc.resolve_source(args.src)
    config = pc.quantization_config(source)
    reports = pc.inspect_checkpoint(source, progress=not args.quiet)
    converted = pc.is_converted(config)
    if converted:
        _describe_quantized(config)
    width = max(len(r.name) for r in reports)
    print(f"{'layer':<{width}}  {'ternary':<7}  {'scales':<18}  {'zeros':>6}  {'dense MiB':>9}  {'packed MiB':>10}")
    for r in reports:
        zeros = f"{r.zero_fraction:.1%}" if r.zero_fraction is not None else "-"
        packed = f"{r.packed_bytes / _MIB:.2f}" if r.packed_bytes is not None else "-"
        print(f"{r.name:<{width}}  {'yes' if r.ternary else 'NO':<7}  {r.layout or '-':<18}  {zeros:>6}  "
              f"{r.dense_bytes / _MIB:>9.2f}  {packed:>10}")
    ternary = [r for r in reports if r.ternary]
    dense = sum(r.dense_bytes for r in reports)
    stored = [r for r in reports if r.dtype.startswith(("bitcpm", "gptq"))] if converted else ternary
    after = sum(r.packed_bytes for r in stored) + sum(r.dense_bytes for r in reports if r not in stored)
    print(f"\nsummary: {len(ternary)}/{len(reports)} linear layers ternary; linear weights "
          f"{dense / _MIB:.1f} MiB" + (f" as bf16, {after / _MIB:.1f} MiB as stored" if converted else
                                       f" -> {after / _MIB:.1f} MiB packed"))
    for r in reports:
        if not r.ternary:
            print(f"not ternary: {r.reason}")
    return 0


def _convert(args) -> int:
    summary = pc.convert(args.src, args.dst, keep_dense=args.keep_dense, overwrite=args.overwrite,
                         shard_bytes=int(args.max_shard_gib * 2**30), progress=not args.quiet, format=args.format)
    kind = "as 4-bit GPTQ (uint4b8, lossless)" if args.format == "gptq" else "packed"
    print(f"wrote {summary['destination']}: {summary['packed_linear_layers']} linear layers {kind} "
          f"({', '.join(f'{n} {g}' for g, n in summary['granularity'].items())}), "
          f"{len(summary['dense_linear_layers'])} kept dense; weights "
          f"{summary['source_weight_bytes'] / _MIB:.1f} MiB -> {summary['packed_file_bytes'] / _MIB:.1f} MiB "
          f"on disk in {summary['shards']} file(s); verified bit for bit against the source")
    return 0


def _tiny_model(args) -> int:
    from vllm_bitcpm.data import tiny_model_path

    print(tiny_model_path())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-bitcpm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="report per linear layer whether it is ternary and how it is scaled")
    p.add_argument("src")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("convert", help="write a packed 2-bit checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--keep-dense", action="append", default=[], metavar="GLOB",
                   help="module or weight name glob to keep dense instead of failing (repeatable)")
    p.add_argument("--format", choices=pc.FORMATS, default="bitcpm",
                   help="bitcpm: 2-bit, for vLLM with this plugin (default); gptq: standard 4-bit GPTQ "
                        "(sym, desc_act false) that vLLM, SGLang or transformers serve without it")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    p.add_argument("--max-shard-gib", type=float, default=2.0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)
    p = sub.add_parser("tiny-model", help="print the directory of the trained tiny ternary model shipped with the "
                                          "package (packed; serve it with vllm serve)")
    p.set_defaults(run=_tiny_model)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (pc.ConversionError, pc.CorruptCheckpointError, FileNotFoundError) as err:
        print(f"vllm-bitcpm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
