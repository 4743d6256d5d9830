"""Version strings, read in one place; standard library only (the image's drift guard and scripts/ import it)."""

from __future__ import annotations

import re
from typing import Optional, Tuple

_LEADING_MAJOR_MINOR = re.compile(r"^(\d+)(?:\.(\d+))?")


def release(version: str) -> str:
    """ "0.32.0+cpu" -> "0.32.0": the public release, without a local build tag."""
    return version.split("+")[0]


def major_minor(version: Optional[str]) -> Optional[Tuple[int, int]]:
    """ "13.0" -> (13, 0), "2.13.0+cpu" -> (2, 13), "13" -> (13, 0); None for "unknown" or ""."""
    match = _LEADING_MAJOR_MINOR.match(version or "")
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def is_major_minor(text: str) -> bool:
    """Exactly major.minor, as "13.0" (RUNPOD_MIN_CUDA_VERSION's form)."""
    return re.fullmatch(r"\d+\.\d+", text) is not None

