"""The QAT training script (vllm_bitcpm.testing.qat_training) and the accuracy report on its model.

The documented model takes minutes to train, so these tests train the ``test`` recipe (same
code, a smaller model, seconds) and check what the real one relies on: the quantizer against a
float64 oracle, the written checkpoint is exactly ternary x scale in bf16 like the releases,
the independent reference forward reproduces the training forward from the files, training is
deterministic, and ``benchmarks/report.py`` on a trained model gives the held-out prompt set and
perplexities per side.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_bitcpm.testing import qat_training
from vllm_bitcpm.testing.offline_corpus import load_corpus

ROOT = Path(__file__).resolve().parent.parent
RECIPE = qat_training.RECIPES["test"]


def _absmean_ternary_oracle(weight: torch.Tensor, group: int) -> torch.Tensor:
    """codes x scale by plain loops over float64 groups (``group`` = in_features for per row)."""
    w = weight.double()
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], group):
            chunk = w[r, c : c + group]
            scale = max(float(chunk.abs().mean()), 1e-8)
            out[r, c : c + group] = torch.tensor([max(-1.0, min(1.0, round(float(x) / scale))) * scale for x in chunk])
    return out


@pytest.mark.parametrize("granularity,group", [("per_row", None), ("per_group", 16)])
def test_ternary_quantize_matches_float64_oracle(granularity, group):
    weight = torch.randn(6, 48, generator=torch.Generator().manual_seed(3))
    codes, scales = qat_training.ternary_quantize(weight, granularity, group or 0)
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    expected = _absmean_ternary_oracle(weight, group or weight.shape[1])
    torch.testing.assert_close((codes * scales).double(), expected, rtol=1e-6, atol=1e-7)


def test_per_group_quantization_refuses_a_partial_group():
    with pytest.raises(ValueError, match=r"in_features \(50\).*group_size \(16\)"):
        qat_training.ternary_quantize(torch.randn(4, 50), "per_group", 16)


def test_fake_quantize_passes_gradients_straight_through():
    weight = torch.randn(4, 32, requires_grad=True)
    upstream = torch.randn(4, 32)
    out = qat_training.fake_quantize(weight, "per_row", 0)
    (out * upstream).sum().backward()
    torch.testing.assert_close(weight.grad, upstream)
    codes, scales = qat_training.ternary_quantize(weight.detach(), "per_row", 0)
    torch.testing.assert_close(out.detach(), codes * scales)


def test_corpus_splits_are_disjoint_and_recorded():
    corpus = load_corpus()
    assert len(corpus.train) > 1000 and len(corpus.held_out) > 20
    assert not set(corpus.train) & set(corpus.held_out)
    assert corpus.describe()["sha256"] == corpus.sha256 and "pydoc_data" in corpus.sources


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return qat_training.train(tmp_path_factory.mktemp("qat") / "model", RECIPE, progress=False)


def test_checkpoint_is_written_like_the_releases(trained):
    from safetensors import safe_open

    config = json.loads((trained / "config.json").read_text())
    assert config["architectures"] == ["MiniCPMForCausalLM"] and config["model_type"] == "minicpm"
    assert config["rope_scaling"]["rope_type"] == "longrope" and config["tie_word_embeddings"]
    linear = set(qat_training.synthetic.linear_weight_names(RECIPE.num_hidden_layers, RECIPE.shape(config["vocab_size"])))
    with safe_open(str(trained / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            assert tensor.dtype == torch.bfloat16, name
            if name not in linear:
                continue
            # One magnitude per group of RECIPE.group_size input columns: ternary x scale.
            groups = tensor.float().view(tensor.shape[0], -1, RECIPE.group_size).abs()
            top = groups.amax(dim=-1, keepdim=True)
            assert bool(((groups == 0) | (groups == top)).all()), name
            assert bool((top > 0).all()), name


def test_reference_forward_reproduces_training_forward(trained):
    """The written files, run by the independent reference, give the model that was trained."""
    from safetensors.torch import load_file

    from vllm_bitcpm.testing.reference_model import ReferenceMiniCPM

    config = json.loads((trained / "config.json").read_text())
    model = qat_training.QATMiniCPM.from_exported(RECIPE, config, load_file(str(trained / "model.safetensors")))
    reference = ReferenceMiniCPM.from_pretrained(trained, dtype=torch.float64)
    ids = [1, 200, 37, 90, 14, 300, 5, 77]
    with torch.no_grad():
        trained_logits = model(torch.tensor([ids]))[0].double()
    torch.testing.assert_close(trained_logits, reference.logits(ids), rtol=1e-4, atol=1e-4)


def test_training_reduces_loss_and_records_it(trained):
    record = qat_training.read_record(trained)
    first, last = record["loss_curve"][0][1], record["loss_curve"][-1][1]
    assert last < first - 2.0, record["loss_curve"]
    assert math.isclose(record["held_out_perplexity"], math.exp(record["held_out_loss"]), rel_tol=1e-3)
    assert record["corpus"]["sha256"] == load_corpus().sha256
    assert record["recipe"] == qat_training.dataclasses.asdict(RECIPE)
    # Held-out prompts come from documents the model never trained on.
    assert len(record["held_out_prompts"]) == RECIPE.held_out_prompts
    for prompt in record["held_out_prompts"]:
        assert not any(prompt in doc for doc in load_corpus().train), prompt


def test_training_is_deterministic(trained, tmp_path):
    again = qat_training.train(tmp_path / "again", RECIPE, progress=False)
    assert (again / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    assert qat_training.ensure_trained(again, RECIPE, progress=False) == again  # cached: not retrained


def test_report_on_a_trained_model_adds_held_out_prompts_and_perplexity(trained, tmp_path):
    sides = ["stock", "plugin-int8-act"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--smoke", "--model", str(trained),
         "--sides", *sides, "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    acc = json.loads((tmp_path / "report.json").read_text())["accuracy"]
    assert acc["prompt_sets"] == {"report prompts": 7, "held-out text": RECIPE.held_out_prompts}
    assert acc["training"]["recipe"]["hidden_size"] == RECIPE.hidden_size
    ref = acc["reference"]["perplexity"]
    for side in sides:
        cand = acc["candidates"][side]
        assert set(cand["summary_by_set"]) == set(acc["prompt_sets"])
        # Same texts, same tokens scored; bf16 engines stay within 1% of the float32 reference.
        assert cand["perplexity"]["tokens"] == ref["tokens"] > 100
        assert abs(cand["perplexity"]["perplexity_rel_diff"]) < 0.01, (side, cand["perplexity"])
    readme = (tmp_path / "README_results.md").read_text()
    assert "held-out text" in readme and "Held-out perplexity" in readme and "qat_training" in readme


def test_demo_uses_a_trained_model_where_one_is_cached(trained):
    proc = subprocess.run([sys.executable, "-m", "vllm_bitcpm.demo", "--trained", str(trained), "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the trained ternary model in {trained}" in proc.stdout
    assert "demo: prompt:     'The for statement is used to'" in proc.stdout and "demo: generation:" in proc.stdout


def test_demo_says_how_to_train_when_no_model_is_cached(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vllm_bitcpm.demo", "--trained", str(tmp_path / "none"),
                           "--shape", "tiny", "--max-tokens", "2"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--train` trains one" in proc.stdout and "writing a synthetic BitCPM checkpoint" in proc.stdout
