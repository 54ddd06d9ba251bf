"""Shared fixtures: synthetic checkpoints and engine runs shared by every engine test.

Engine starts are the expensive part of the suite, so every test that needs stock vLLM or
vLLM + plugin reads from one session-wide run per side (each a single child process that
starts one in-process engine per checkpoint; see vllm_bitcpm.testing.sidebyside).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property-based sweeps: a few dozen cases per test in the default run (CI), 1000 with
# `pytest --hypothesis-profile=long`. No deadline: the first call of a kernel path pays one-off
# costs (brgemm's JIT, thread pools) that are not a property of the case.
settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("long", max_examples=1000, deadline=None)
settings.load_profile("ci")

from vllm_bitcpm.testing import synthetic
from vllm_bitcpm.testing.sidebyside import EngineJob, run_engine_jobs

MAX_TOKENS = 32
LOGPROBS = 10

#: Measured figures (greedy agreement, near-ties excused, accuracy vs the reference) that
#: tests report; printed at the end of every run, passing or not.
FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("vllm-bitcpm measured figures")
        for line in FIGURES:
            terminalreporter.write_line(line)

#: name -> write_checkpoint keyword arguments (all "tiny", bf16 on disk like BitCPM4)
CHECKPOINTS = {
    "per_tensor": dict(granularity="per_tensor"),
    "per_row": dict(granularity="per_row"),
    "per_group": dict(granularity="per_group", group_size=64),
    "dense": dict(granularity="dense"),
    "mixed": dict(granularity="per_row", non_ternary_layers=["model.layers.1.mlp.down_proj.weight"]),
}
TERNARY_GRANULARITIES = ("per_tensor", "per_row", "per_group")


def _tokenize(path: Path, prompts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    from vllm_bitcpm.config import register_config

    register_config()  # AutoTokenizer reads config.json, whose model_type transformers lacks
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return [tokenizer(p).input_ids for p in prompts]


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    for name, kwargs in CHECKPOINTS.items():
        synthetic.write_checkpoint(root / name, shape="tiny", seed=0, **kwargs)
    # A checkpoint that names its method: vLLM must select bitcpm from config.json alone.
    flagged = root / "flagged"
    shutil.copytree(root / "per_row", flagged)
    config = json.loads((flagged / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitcpm"}
    (flagged / "config.json").write_text(json.dumps(config, indent=2))
    # A truncated copy: the last tensor's bytes are cut off.
    truncated = root / "truncated"
    shutil.copytree(root / "per_row", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return root


@pytest.fixture(scope="session")
def prompt_ids(checkpoint_dir) -> list[list[int]]:
    """The same token ids for every tiny checkpoint (they share one tokenizer)."""
    ids = _tokenize(checkpoint_dir / "per_row", synthetic.REPORT_PROMPTS + synthetic.TEST_PROMPTS)
    assert len(ids) >= 8 and all(len(i) >= 3 for i in ids)
    return ids


def _jobs(checkpoint_dir: Path, prompt_ids, names, **overrides) -> list[EngineJob]:
    return [
        EngineJob(model=str(checkpoint_dir / name), prompts=prompt_ids, max_tokens=MAX_TOKENS,
                  logprobs=LOGPROBS, **overrides)
        for name in names
    ]


@pytest.fixture(scope="session")
def stock_runs(checkpoint_dir, prompt_ids) -> dict[str, dict]:
    """Stock vLLM (plugin disabled), float32 (+ per_row in bf16); remote-code config."""
    names = list(CHECKPOINTS)
    jobs = _jobs(checkpoint_dir, prompt_ids, names, trust_remote_code=True)
    jobs += _jobs(checkpoint_dir, prompt_ids, ["per_row"], trust_remote_code=True, dtype="bfloat16")
    results = run_engine_jobs(jobs, plugin=False)
    return dict(zip([*names, "bf16"], results))


#: plugin-side jobs: (result key, checkpoint, EngineJob overrides)
PLUGIN_JOBS = [
    *[(name, name, {}) for name in CHECKPOINTS],
    ("flagged", "flagged", {}),
    ("forced_ternary", "per_row", {"quantization": "bitcpm"}),
    ("forced_dense", "dense", {"quantization": "bitcpm"}),
    ("truncated", "truncated", {}),
    ("bf16", "per_row", {"dtype": "bfloat16"}),
    # one sequence at a time: every logits call has one token (the lm_head's decode kernel)
    ("bf16_one_at_a_time", "per_row", {"dtype": "bfloat16", "llm_kwargs": {"max_num_seqs": 1}}),
]


@pytest.fixture(scope="session")
def plugin_runs(checkpoint_dir, prompt_ids) -> dict[str, dict]:
    jobs = [
        EngineJob(model=str(checkpoint_dir / ckpt), prompts=prompt_ids, max_tokens=MAX_TOKENS,
                  logprobs=LOGPROBS, **overrides)
        for _, ckpt, overrides in PLUGIN_JOBS
    ]
    results = run_engine_jobs(jobs, plugin=True)
    return {key: result for (key, _, _), result in zip(PLUGIN_JOBS, results)}


@pytest.fixture(scope="session")
def reference_logits(checkpoint_dir, prompt_ids):
    """float64 next-token logits of the independent reference, per ternary checkpoint."""
    from vllm_bitcpm.testing.reference_model import ReferenceMiniCPM

    out = {}
    for name in (*TERNARY_GRANULARITIES, "dense", "mixed"):
        model = ReferenceMiniCPM.from_pretrained(checkpoint_dir / name, dtype=torch.float64)
        out[name] = [model.next_token_logits(ids) for ids in prompt_ids]
    return out
