"""Rebuild the packaged tiny model (vllm_bitcpm/data/bitcpm-tiny) from the project's own recipe.

    .venv/bin/python -m vllm_bitcpm.testing.tiny_model_data

1. trains the QAT model (vllm_bitcpm.testing.qat_training, default recipe; reuses a cached one in
   --trained when its record carries the same recipe),
2. packs it with ``vllm-bitcpm convert`` (the converter verifies every packed layer bit for bit),
3. writes ``held_out_tokens.json``: the first ``held_out_tokens + 1`` ids of the held-out stream,
   the ids the record's ``held_out_perplexity`` was measured on, so the shipped file can be
   re-scored on any machine without the corpus (whose text depends on the Python version).

Training is seeded; its result is the same on the same machine, torch version and thread count
(the record states them), not across machines, so a rebuild elsewhere is a new model: commit
the new files together.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vllm_bitcpm.data import HELD_OUT_TOKENS, TINY_MODEL


def held_out_ids(trained: Path, record: dict) -> list[int]:
    """The held-out stream as training scored it: same corpus split, same tokenizer, same length."""
    from tokenizers import Tokenizer

    from vllm_bitcpm.testing.offline_corpus import load_corpus
    from vllm_bitcpm.testing.qat_training import _token_stream

    corpus = load_corpus()
    if corpus.sha256 != record["corpus"]["sha256"]:
        raise SystemExit(f"the corpus of this Python ({corpus.sha256[:12]}) is not the one {trained} was trained "
                         f"on ({record['corpus']['sha256'][:12]}): retrain (delete {trained}) on this machine")
    tokenizer = Tokenizer.from_file(str(trained / "tokenizer.json"))
    stream = _token_stream(tokenizer, corpus.held_out)
    seq = record["recipe"]["seq_len"]
    usable = min(record["recipe"]["held_out_tokens"], (stream.numel() - 1) // seq * seq)
    return stream[: usable + 1].tolist()


def window_nll(trained: Path, record: dict, ids: list[int]) -> list[float]:
    """Each window's summed NLL (nats) by the training code's own evaluation (qat_training.window_losses)
    of the trained bf16 weights: what the record's perplexity averages; tests re-score the windows."""
    import torch
    from safetensors.torch import load_file

    from vllm_bitcpm.testing.qat_training import QATMiniCPM, TrainingRecipe, window_losses

    config = json.loads((trained / "config.json").read_text())
    model = QATMiniCPM.from_exported(TrainingRecipe(**record["recipe"]), config,
                                     load_file(str(trained / "model.safetensors")))
    return [round(float(v), 4) for v in window_losses(model, torch.tensor(ids), len(ids) - 1)]


def build(trained: Path, out: Path, threads: int | None = None) -> Path:
    from vllm_bitcpm import packed_checkpoint as pc
    from vllm_bitcpm.testing.qat_training import ensure_trained, read_record

    ensure_trained(trained, threads=threads)
    record = read_record(trained)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        staged = Path(scratch) / out.name
        pc.convert(str(trained), str(staged), progress=True)
        ids = held_out_ids(trained, record)
        (staged / HELD_OUT_TOKENS).write_text(json.dumps({
            "about": "held-out token ids (the model's own tokenizer) that bitcpm_training.json's "
                     "held_out_perplexity was measured on: windows of seq_len tokens, each scored on "
                     "its next tokens; window_nll: each window's summed NLL (nats) by the training code",
            "seq_len": record["recipe"]["seq_len"], "held_out_loss": record["held_out_loss"],
            "held_out_perplexity": record["held_out_perplexity"], "corpus_sha256": record["corpus"]["sha256"],
            "window_nll": window_nll(trained, record, ids), "ids": ids}, separators=(",", ":")) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trained", default="checkpoints/trained-bitcpm-tiny",
                        help="where the QAT model is trained / cached (bf16, fake-quantized)")
    parser.add_argument("--out", default=str(TINY_MODEL), help="the packed model's directory (default: the package's)")
    parser.add_argument("--threads", type=int, help="torch threads for training (recorded)")
    args = parser.parse_args(argv)
    out = build(Path(args.trained), Path(args.out), args.threads)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
