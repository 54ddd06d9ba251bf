#!/usr/bin/env python3
"""Build the GPU bundle: vLLM 0.25.1 (CUDA 13) + the deps the H200 image lacks, for benchmarks/gpu_check.py.

The lent GPU machines have torch 2.11.0+cu130 on Python 3.12 but no vLLM and no internet, and each
device call carries at most 64 MiB. So: download the wheels pinned in requirements-gpu-bundle.txt
(cached in .gpu/cache/wheels; a rerun downloads only what is missing), lay them out as one
site-packages tree (vLLM trimmed of what the check never loads), tar | xz -9 it, split it into
parts under --max-part-mib, one per folder .gpu/1, .gpu/2, ..., and put SHA256SUMS and the
device-side scripts in .gpu/s. See scripts/gpu/README.md for the device calls.

Needs: network access to PyPI (unless the cache is complete), python3.12 with pip (for the tags of
the installed wheels), GNU tar, xz, split. Usage: python3 scripts/gpu/build-bundle.py [--dry-run]
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
REQUIREMENTS = HERE / "requirements-gpu-bundle.txt"
DEVICE_FILES = ["install-and-check.sh", "preflight.py", "README.md"]

# Dropped from the vLLM wheel (about 330 MiB of 606): not loaded by gpu_check on an H200 with the
# plugin. FA2 (the H200 gets FA3), the MoE ops, the Rust frontend binary, and the CUDA sources that
# DeepGEMM / the SM100 FMHA JIT-compile at run time.
VLLM_DROP = [
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
    "vllm/_moe_C_stable_libtorch.abi3.so",
    "vllm/vllm-rs",
    "vllm/third_party/deep_gemm/",
    "vllm/third_party/fmha_sm100/",
]

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_5_x86_64", "manylinux_2_12_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_26_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"]

# Fixed tar metadata, so the same wheels give the same bytes (and SHA256SUMS) on every build.
TAR_MTIME = "@1767225600"  # 2026-01-01T00:00:00Z
MiB = 1 << 20


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(path: Path = REQUIREMENTS) -> list[dict]:
    """`name==version [--hash=sha256:HEX]` per line; anything else is an error."""
    reqs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        if not m:
            raise ValueError(f"{path.name}:{lineno}: not an exact `name==version` pin: {line!r}")
        hashes = re.findall(r"sha256:([0-9a-f]{64})", m.group(3))
        reqs.append({"name": m.group(1), "version": m.group(2), "hashes": hashes, "line": line})
    names = [canon(r["name"]) for r in reqs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path.name}: listed twice: {dupes}")
    return reqs


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_wheel(req: dict, wheels: Path) -> Path | None:
    """The cached wheel for this pin (right name, version and, where pinned, hash), if any."""
    for w in sorted(wheels.glob("*.whl")):
        parts = w.name.split("-")
        if len(parts) >= 5 and canon(parts[0]) == canon(req["name"]) and parts[1] == req["version"]:
            if not req["hashes"] or sha256(w) in req["hashes"]:
                return w
    return None


def find_python312(explicit: str | None) -> str | None:
    cands = [explicit] if explicit else [os.environ.get("PYTHON312"), shutil.which("python3.12"),
                                         *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))]
    for c in cands:
        if not c:
            continue
        try:
            out = subprocess.run([c, "-c", "import sys, pip; print(sys.version_info[:2] == (3, 12))"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "True":
            return c
        if explicit:
            raise SystemExit(f"--python {explicit}: not a Python 3.12 with pip")
    return None


def plugin_metadata() -> dict:
    """Name, version and entry points of vllm-bitcpm, read from setup.py's setup(...) call."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            return {"name": ast.literal_eval(kw["name"]), "version": ast.literal_eval(kw["version"]),
                    "entry_points": ast.literal_eval(kw["entry_points"])}
    raise SystemExit("setup.py: no setup(...) call found")


def write_plugin_dist_info(site: Path) -> Path:
    """vllm_bitcpm-<v>.dist-info with entry_points.txt: registers the plugin, whose code stays in the repo."""
    meta = plugin_metadata()
    d = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
        "Summary: vllm-bitcpm plugin registered for the GPU check (package imported from the repo on PYTHONPATH)\n")
    (d / "INSTALLER").write_text("pip\n")
    (d / "top_level.txt").write_text("vllm_bitcpm\n")
    groups = []
    for group, entries in meta["entry_points"].items():
        groups.append(f"[{group}]\n" + "".join(f"{e.replace(' ', '').replace('=', ' = ', 1)}\n" for e in entries))
    (d / "entry_points.txt").write_text("\n".join(groups))
    return d


def extract_vllm(wheel: Path, site: Path) -> tuple[int, int]:
    """Unzip the vLLM wheel into site minus VLLM_DROP, keeping file modes. Returns (kept, dropped) counts."""
    kept = dropped = 0
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if any(info.filename == p or (p.endswith("/") and info.filename.startswith(p)) for p in VLLM_DROP):
                dropped += 1
                continue
            target = Path(z.extract(info, site))
            mode = info.external_attr >> 16
            if mode and not info.is_dir():
                os.chmod(target, stat.S_IMODE(mode))
            kept += not info.is_dir()
    return kept, dropped


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def tree_bytes() -> int:
    """What every device call sends besides the carried paths: tracked + untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sum((ROOT / f).stat().st_size for f in out.decode().split("\0") if f and (ROOT / f).is_file())


def ensure_ignored(out: Path) -> str:
    """The bundle must never travel as untracked files: add out to .git/info/exclude if git does not ignore it."""
    try:
        rel = out.resolve().relative_to(ROOT)
    except ValueError:
        return f"{out} is outside the repo"
    probe = subprocess.run(["git", "check-ignore", "-q", f"{rel}/x"], cwd=ROOT)
    if probe.returncode == 0:
        return f"/{rel}/ already ignored by git"
    exclude = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.strip())
    exclude = exclude if exclude.is_absolute() else ROOT / exclude
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with open(exclude, "a") as f:
        f.write(f"/{rel}/\n")
    return f"added /{rel}/ to {exclude}"


def fmt(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Writes OUT/1..N (the parts), OUT/s (SHA256SUMS + device scripts), "
                                        "OUT/cache (wheels, staging tree, whole bundle.tar.xz).")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (pins, cache state, drops, outputs); "
                    "download and write nothing")
    ap.add_argument("--download-only", action="store_true", help="fill the wheel cache and stop")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu", help="output folder (default: <repo>/.gpu)")
    ap.add_argument("--cache-dir", type=Path, help="wheel cache and staging (default: OUT/cache)")
    ap.add_argument("--python", help="Python 3.12 with pip (default: python3.12 on PATH, then ~/.pyenv/versions/3.12*)")
    ap.add_argument("--max-part-mib", type=float, default=58.0,
                    help="largest part (default 58: a call carries 64 MiB, the working tree included)")
    ap.add_argument("--xz-threads", type=int, default=1, help="xz -T (default 1: deterministic, best ratio)")
    args = ap.parse_args()

    t_start = time.monotonic()
    out = args.out.resolve()
    cache = (args.cache_dir or out / "cache").resolve()
    wheels, site = cache / "wheels", cache / "site"
    reqs = parse_requirements()
    if canon(reqs[0]["name"]) != "vllm":
        raise SystemExit(f"{REQUIREMENTS.name}: vllm must be the first pin")
    have = {r["name"]: cached_wheel(r, wheels) if wheels.is_dir() else None for r in reqs}
    missing = [r for r in reqs if have[r["name"]] is None]

    print(f"== requirements: {REQUIREMENTS.relative_to(ROOT)} ({len(reqs)} pins)")
    for r in reqs:
        print(f"   {r['name'] + '==' + r['version']:<36} {'cached ' + have[r['name']].name if have[r['name']] else 'to download'}")
    print(f"== vLLM wheel minus: {', '.join(VLLM_DROP)}")
    print(f"== plugin dist-info from setup.py: {plugin_metadata()['entry_points']}")
    print(f"== cache {cache}; outputs {out}/1..N (parts <= {args.max_part_mib} MiB), {out}/s "
          f"(SHA256SUMS, {', '.join(DEVICE_FILES)})")
    if args.dry_run:
        py = find_python312(args.python)
        print(f"== python3.12: {py or 'NOT FOUND (needed unless --dry-run; pass --python)'}")
        print(f"== dry run: {len(missing)} wheel(s) would be downloaded; nothing written")
        return 0

    py = find_python312(args.python)
    if py is None:
        raise SystemExit("no Python 3.12 with pip found: pass --python /path/to/python3.12")
    print(f"== python3.12: {py}; {ensure_ignored(out)}")
    for tool in ("tar", "xz", "split", "nice"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")

    # 1. Wheels: only the missing ones, all in one pip call, checked against the pinned hashes.
    t = time.monotonic()
    wheels.mkdir(parents=True, exist_ok=True)
    if missing:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("".join(r["line"] + "\n" for r in missing))
        cmd = [py, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
               "--disable-pip-version-check", "-d", str(wheels), "-r", f.name]
        if all(r["hashes"] for r in missing):
            cmd.append("--require-hashes")
        print(f"== downloading {len(missing)} wheel(s)", flush=True)
        subprocess.run(cmd, check=True)
        os.unlink(f.name)
        have = {r["name"]: cached_wheel(r, wheels) for r in reqs}
        still = [r["line"] for r in reqs if have[r["name"]] is None]
        if still:
            raise SystemExit(f"downloaded, but no matching wheel in {wheels} for: {still}")
    print(f"== wheels ready in {time.monotonic() - t:.0f} s: "
          f"{fmt(sum(w.stat().st_size for w in have.values()))} in {len(have)} files", flush=True)
    if args.download_only:
        return 0

    # 2. The site-packages tree, rebuilt from scratch each time.
    t = time.monotonic()
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    kept, dropped = extract_vllm(have[reqs[0]["name"]], site)
    deps = [str(have[r["name"]]) for r in reqs[1:]]
    subprocess.run(["nice", "-n", "19", py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--root-user-action=ignore", "--target", str(site), *deps], check=True)
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's interpreter path
    dist_info = write_plugin_dist_info(site)
    nfiles = sum(1 for p in site.rglob("*") if p.is_file())
    tree = du(site)
    print(f"== site tree in {time.monotonic() - t:.0f} s: {nfiles} files, {fmt(tree)} "
          f"(vLLM: {kept} files kept, {dropped} dropped; {len(deps)} deps; {dist_info.name})", flush=True)

    # 3. tar | xz -9 (deterministic: sorted names, fixed owner, mtime and modes).
    t = time.monotonic()
    bundle = cache / "bundle.tar.xz"
    with open(bundle, "wb") as f:
        tar = subprocess.Popen(["nice", "-n", "19", "tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
                                f"--mtime={TAR_MTIME}", "--mode=u+rwX,go+rX,go-w", "-C", str(site), "-cf", "-", "."],
                               stdout=subprocess.PIPE)
        xz = subprocess.Popen(["nice", "-n", "19", "xz", "-9", f"-T{args.xz_threads}", "-c"], stdin=tar.stdout, stdout=f)
        tar.stdout.close()
        if xz.wait() or tar.wait():
            raise SystemExit(f"tar | xz failed ({tar.returncode}, {xz.returncode})")
    size = bundle.stat().st_size
    print(f"== {bundle.name}: {fmt(size)} ({100 * size / tree:.0f}% of the tree) in {time.monotonic() - t:.0f} s",
          flush=True)

    # 4. Equal parts, one per folder OUT/1..N; stale part folders removed.
    nparts = math.ceil(size / (args.max_part_mib * MiB))
    if nparts > 10:
        raise SystemExit(f"{nparts} parts: more than the 10 that one-digit suffixes name")
    for old in out.iterdir() if out.is_dir() else []:
        if old.is_dir() and old.name.isdigit():
            shutil.rmtree(old)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(["split", "-d", "-a", "1", "-n", str(nparts), str(bundle), f"{tmp}/bundle.tar.xz.part-"],
                       check=True)
        parts = []
        for i, p in enumerate(sorted(Path(tmp).iterdir()), 1):
            (out / str(i)).mkdir(parents=True)
            parts.append(Path(shutil.move(str(p), out / str(i) / p.name)))

    # 5. OUT/s: device scripts + SHA256SUMS (the parts, then the whole).
    s = out / "s"
    shutil.rmtree(s, ignore_errors=True)
    s.mkdir(parents=True)
    for name in DEVICE_FILES:
        shutil.copy2(HERE / name, s / name)
    (s / "SHA256SUMS").write_text("".join(f"{sha256(p)}  {p.name}\n" for p in parts) + f"{sha256(bundle)}  {bundle.name}\n")
    (s / "MANIFEST.txt").write_text(
        f"built {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by scripts/gpu/build-bundle.py\n"
        f"tree: {nfiles} files, {fmt(tree)}; {bundle.name}: {size} bytes in {nparts} parts\n"
        f"vLLM wheel minus: {' '.join(VLLM_DROP)}\n" + "".join(f"{w.name}\n" for w in have.values()))

    tree_now = tree_bytes()
    print(f"== parts: " + ", ".join(f"{p.relative_to(out.parent)} {fmt(p.stat().st_size)}" for p in parts))
    print(f"== {s.relative_to(out.parent)}: {', '.join(sorted(x.name for x in s.iterdir()))} ({fmt(du(s))})")
    print(f"== each call also sends the working tree: {fmt(tree_now)}; largest call "
          f"{fmt(max(p.stat().st_size for p in parts) + du(s) + tree_now)} of 64 MiB")
    if max(p.stat().st_size for p in parts) + du(s) + tree_now > 64 * MiB:
        print("!! over 64 MiB: lower --max-part-mib")
        return 1
    print(f"== done in {time.monotonic() - t_start:.0f} s. Device calls: scripts/gpu/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
