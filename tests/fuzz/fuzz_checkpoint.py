"""libFuzzer target (atheris): the checkpoint readers on arbitrary bytes, as a stranger's file.

    .venv/bin/python tests/fuzz/make_corpus.py /tmp/corpus
    .venv/bin/python tests/fuzz/fuzz_checkpoint.py -max_len=4096 -dict=tests/fuzz/checkpoint.dict -runs=1000000 /tmp/corpus

Each input is written as the ``model.safetensors`` of a packed ``bitcpm`` checkpoint (a fixed
config.json: group_size 64, layout version 1) and read the ways the package reads checkpoints:
``validate_safetensors`` + ``SafetensorsReader`` (every tensor), ``validate_packed_layout`` (what
engine load checks first) and ``inspect_checkpoint`` (which unpacks the codes). Each may end in
``CorruptCheckpointError`` or ``ConversionError`` naming the file or directory; any other exception,
a crash, or a reader using more than libFuzzer's -rss_limit_mb (2 GB) is a finding. The seeds are
small valid packed files written by tests/fuzz/make_corpus.py;
tests/test_checkpoint_fuzz.py runs this target for a bounded number of inputs.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris
import torch  # noqa: F401  (imported before instrumentation: not the code under test)

with atheris.instrument_imports(include=["vllm_bitcpm"]):
    from vllm_bitcpm import packed_checkpoint as pc
    from vllm_bitcpm.checkpoint_files import CorruptCheckpointError, SafetensorsReader

CONFIG = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
          "quantization_config": {"quant_method": "bitcpm", "bits": 2, "layout_version": 1, "group_size": 64}}
DIRECTORY = Path(tempfile.mkdtemp(prefix="bitcpm-fuzz-"))
(DIRECTORY / "config.json").write_text(json.dumps(CONFIG))
FILE = DIRECTORY / "model.safetensors"


def read_all(data: bytes) -> None:
    FILE.write_bytes(data)
    try:
        reader = SafetensorsReader(FILE)
        for name in reader.keys():
            tensor = reader.get_tensor(name)
            if list(tensor.shape) != reader.header[name]["shape"]:
                raise AssertionError(f"{name}: read {list(tensor.shape)}, header says {reader.header[name]['shape']}")
        pc.validate_packed_layout(DIRECTORY, CONFIG["quantization_config"])
        pc.inspect_checkpoint(DIRECTORY, progress=False)
    except (CorruptCheckpointError, pc.ConversionError) as error:
        if str(DIRECTORY) not in str(error):
            raise AssertionError(f"error does not name the file or directory: {error}") from error


def main() -> None:
    atheris.Setup(sys.argv, read_all)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
