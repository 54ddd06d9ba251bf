"""Crafted and damaged checkpoint files: every reader ends in a clear error naming the file, or reads
what the file really holds. A checkpoint comes from a stranger on a model hub, so a reader that
crashes, reads out of bounds, or half-writes a conversion on a crafted file is a security bug.

Mutations of real files (a safetensors file written by the safetensors library, and a tiny
synthetic BitCPM checkpoint): truncation, flipped bytes anywhere, header entries with wrong or
hostile dtypes, shapes and offsets (negative, huge, reversed, overlapping, not integers), header
lengths past the file or the 100 MB limit, headers that are not JSON objects. Checked:
`validate_safetensors` / `SafetensorsReader` (what `inspect`, `convert` and engine loading open
files with) and `convert` itself, which must leave no output behind when it fails. A few dozen
cases per test by default, `--hypothesis-profile=long` for 1000.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_bitcpm import packed_checkpoint as pc
from vllm_bitcpm.testing import synthetic
from vllm_bitcpm.checkpoint_files import MAX_HEADER_BYTES, CorruptCheckpointError, SafetensorsReader

FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

HOSTILE_VALUES = [-1, -(2**63), 2**63, 2**70, 1.5, "12", None, [], {}, True, [1, 2, 3], [-5, 4], [10, 2]]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> bytes:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({"a.weight": torch.randn(8, 16).to(torch.bfloat16), "b.codes": torch.randint(0, 255, (4, 32),
               dtype=torch.uint8), "c.scales": torch.randn(4, 1)}, str(path), metadata={"format": "pt"})
    return path.read_bytes()


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


@st.composite
def mutations(draw, blob: bytes):
    header, data = split(blob)
    kind = draw(st.sampled_from(["truncate", "flip", "entry", "header_len", "not_object", "overlap"]))
    if kind == "truncate":
        return blob[:draw(st.integers(0, len(blob) - 1))]
    if kind == "flip":
        out = bytearray(blob)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "entry":
        name = draw(st.sampled_from([k for k in header if k != "__metadata__"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop"]))
        entry = dict(header[name])
        if field == "drop":
            entry.pop(draw(st.sampled_from(list(entry))))
        elif field == "dtype":
            entry["dtype"] = draw(st.sampled_from(["F64", "U8", "BF16", "I64", "F8_E4M3", "X9", 7, None]))
        elif field == "shape":
            entry["shape"] = draw(st.sampled_from([[2**40, 2**40], [-1, 16], [0], [], [8, 16, 1], [1.5], "8"]
                                                  + HOSTILE_VALUES))
        else:
            entry["data_offsets"] = draw(st.sampled_from(HOSTILE_VALUES + [[0, len(data) + 1], [0, 2**64]]))
        header = {**header, name: entry}
        return join(header, data)
    if kind == "header_len":
        raw = json.dumps(header).encode()
        length = draw(st.sampled_from([0, 1, len(raw) - 1, len(raw) + 1, len(blob), MAX_HEADER_BYTES + 1, 2**64 - 1]))
        return join(raw, data, header_len=length)
    if kind == "not_object":
        return join(draw(st.sampled_from([[1, 2], "text", 3, None, [header]])), data)
    names = [k for k in header if k != "__metadata__"]
    a, b = names[0], names[1]
    header = {**header, b: {**header[b], "data_offsets": header[a]["data_offsets"]}}  # two tensors, one span
    return join(header, data)


def read_everything(path: Path) -> None:
    """What inspect, convert and loading do to a file: open it, read every tensor."""
    reader = SafetensorsReader(path)
    for name in reader.keys():
        tensor = reader.get_tensor(name)
        info = reader.header[name]
        assert list(tensor.shape) == info["shape"]


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_fail_clearly_or_read_what_they_hold(tmp_path, original, data):
    blob = data.draw(mutations(original))
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    try:
        read_everything(path)
    except CorruptCheckpointError as error:
        assert str(path) in str(error), error


@pytest.mark.parametrize("length", [MAX_HEADER_BYTES + 1])
def test_header_over_the_limit_is_refused_before_it_is_read(tmp_path, length):
    """A file big enough to hold a 100 MB+ header: refused by its length alone (sparse file)."""
    path = tmp_path / "big.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", length))
        f.seek(length + 16)
        f.write(b"\0")
    with pytest.raises(CorruptCheckpointError, match="over the 100000000-byte limit"):
        read_everything(path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    synthetic.write_checkpoint(path, shape="tiny", seed=0, granularity="per_row")
    return path


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          max_examples=max(8, settings.default.max_examples // 4))
@given(data=st.data())
def test_convert_of_a_damaged_checkpoint_fails_clearly_and_writes_nothing(tiny_checkpoint, data):
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="fuzz-convert-"))  # one per example (tmp_path is per test)
    source = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, source)
    weights = sorted(source.glob("*.safetensors"))[0]
    weights.write_bytes(data.draw(mutations(weights.read_bytes())))
    out = tmp_path / "out"
    try:
        pc.convert(str(source), out, progress=False)
    except (pc.ConversionError, CorruptCheckpointError) as error:
        assert str(source) in str(error), error
        assert not out.exists() or not any(out.iterdir()), f"partial output left in {out}"
    else:  # the mutation left the file valid (e.g. a flipped bit in a weight's value): a full output
        assert (out / "config.json").exists()
    finally:
        shutil.rmtree(tmp_path)


# Regression cases: what the reader did before its header checks (found by the sweep above).
REGRESSIONS = {
    "header is a JSON list": (lambda h: [1, 2], "not an object of tensors"),  # was AttributeError
    "offset is a string": (lambda h: {**h, "a.weight": {**h["a.weight"], "data_offsets": [0, "256"]}},
                           "data_offsets"),  # was TypeError
    # was read without error: bytes before the data section (the header itself) as tensor data
    "negative begin": (lambda h: {**h, "a.weight": {**h["a.weight"], "data_offsets": [-256, 0]}}, "data_offsets"),
    # was read without error: two tensors aliasing the same bytes
    "two tensors, one span": (lambda h: {**h, "c.scales": {**h["c.scales"], "data_offsets": [
        h["a.weight"]["data_offsets"][0], h["a.weight"]["data_offsets"][0] + 16]}}, "overlap"),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_regressions_fail_with_a_clear_error(tmp_path, original, case):
    mutate, message = REGRESSIONS[case]
    header, data = split(original)
    path = tmp_path / "model.safetensors"
    path.write_bytes(join(mutate(header), data))
    with pytest.raises(CorruptCheckpointError, match=message) as error:
        read_everything(path)
    assert str(path) in str(error.value)
