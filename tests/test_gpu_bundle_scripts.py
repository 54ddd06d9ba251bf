"""scripts/gpu/: the GPU-check bundle's build script and device-side scripts, checked offline.

The bundle itself (vLLM 0.25.1 + deps, ~80 MiB compressed) is built only on demand and run only on
a lent GPU machine, so here: the scripts parse, every wheel is pinned exactly, the build's plan
(--dry-run: no pip, no network, nothing written) runs, the trimming of the vLLM wheel drops what it
should and nothing else, and the plugin's dist-info registers the entry point setup.py declares.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "scripts" / "gpu"
BUILD = GPU / "build-bundle.py"
REQS = GPU / "requirements-gpu-bundle.txt"


def _build_module():
    spec = importlib.util.spec_from_file_location("gpu_build_bundle", BUILD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _offline_env() -> dict[str, str]:
    # Belt and braces: the dry run never calls pip, but if it did, it could not reach an index.
    return {**os.environ, "PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/", "https_proxy": "http://127.0.0.1:9/"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("script", sorted(p.name for p in GPU.glob("*.sh")))
def test_shell_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", ["build-bundle.py", "preflight.py"])
def test_python_scripts_compile(script):
    compile((GPU / script).read_text(), str(GPU / script), "exec")


def test_every_wheel_pinned_exactly_once():
    """The shipped file as the build script reads it (its parser refuses loose pins and repeats:
    test_parse_requirements_rejects_loose_pins): every pin hashed, vLLM 0.25.1 first."""
    reqs = _build_module().parse_requirements(REQS)
    assert len(reqs) > 1 and all(len(r["hashes"]) == 1 for r in reqs), [r["line"] for r in reqs if not r["hashes"]]
    assert (reqs[0]["name"], reqs[0]["version"]) == ("vllm", "0.25.1"), "vLLM 0.25.1 first (the CUDA 13 build for torch 2.11)"


def test_parse_requirements_rejects_loose_pins(tmp_path):
    mod = _build_module()
    for bad in ["vllm>=0.25", "vllm", "vllm==0.25.*", "vllm==0.25.1\nVLLM==0.25.1"]:
        (tmp_path / "r.txt").write_text(bad + "\n")
        with pytest.raises(ValueError):
            mod.parse_requirements(tmp_path / "r.txt")


def test_help_runs():
    res = subprocess.run([sys.executable, str(BUILD), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--dry-run" in res.stdout and "--max-part-mib" in res.stdout


def test_dry_run_lists_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu"
    res = subprocess.run([sys.executable, str(BUILD), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, env=_offline_env())
    assert res.returncode == 0, res.stdout + res.stderr
    for ln in REQS.read_text().splitlines():
        pin = ln.split("#", 1)[0].split()
        if pin:
            assert re.search(rf"^\s+{re.escape(pin[0])}\s+to download$", res.stdout, re.M), pin[0]
    for dropped in ("_vllm_fa2_C", "_moe_C_stable_libtorch", "vllm/vllm-rs", "third_party/deep_gemm",
                    "third_party/fmha_sm100"):
        assert dropped in res.stdout
    assert "nothing written" in res.stdout
    assert not out.exists()


def test_vllm_trim_drops_exactly_the_listed_paths(tmp_path):
    mod = _build_module()
    wheel = tmp_path / "vllm-0.0.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    keep = ["vllm/__init__.py", "vllm/_C_stable_libtorch.abi3.so", "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so",
            "vllm/third_party/flashmla/x.py", "vllm/third_party/deep_gemm_like/y.py", "vllm-0.0.0.dist-info/RECORD"]
    drop = ["vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so", "vllm/vllm-rs",
            "vllm/third_party/deep_gemm/include/a.h", "vllm/third_party/fmha_sm100/b.hpp"]
    with zipfile.ZipFile(wheel, "w") as z:
        for name in keep + drop:
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            z.writestr(info, name)
    site = tmp_path / "site"
    assert mod.extract_vllm(wheel, site) == (len(keep), len(drop))
    assert sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()) == sorted(keep)
    assert stat.S_IMODE((site / "vllm/_C_stable_libtorch.abi3.so").stat().st_mode) == 0o755


def test_plugin_dist_info_registers_setup_py_entry_points(tmp_path):
    d = _build_module().write_plugin_dist_info(tmp_path)
    dist = md.PathDistribution(d)
    assert dist.metadata["Name"] == "vllm-bitcpm"
    eps = {(e.group, e.name): e.value for e in dist.entry_points}
    assert eps[("vllm.general_plugins", "bitcpm")] == "vllm_bitcpm:register"
    assert eps[("console_scripts", "vllm-bitcpm")] == "vllm_bitcpm.cli:main"


def test_device_files_exist_and_agree():
    mod = _build_module()
    for name in mod.DEVICE_FILES:
        assert (GPU / name).is_file(), name
    install = (GPU / "install-and-check.sh").read_text()
    assert "SHA256SUMS" in install and "preflight.py" in install and "benchmarks/gpu_check.py" in install
    assert (ROOT / "benchmarks" / "gpu_check.py").is_file()
    readme = (GPU / "README.md").read_text()
    assert "bash .gpu/s/install-and-check.sh" in readme and '".gpu/1"' in readme
