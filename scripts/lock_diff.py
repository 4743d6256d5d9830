"""Which packages of a lock this Python has at another version, or lacks: proof a GPU run used the lock.

    python3 scripts/lock_diff.py [requirements.lock]     # exit 1 if any package differs

Run it on the GPU host with the kit's PYTHONPATH: every line it prints is a version the run did
not share with the image. Packages the kit leaves out on purpose (FlashInfer, ...) show as missing.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from gams_worker.versions import release  # noqa: E402 (standard library only)


def main(argv: list) -> int:
    lock = Path(argv[0] if argv else ROOT / "requirements.lock")
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
                 for d in importlib.metadata.distributions()}
    differing = 0
    for line in lock.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" not in line:
            continue
        name, version = line.split("==")
        have = installed.get(re.sub(r"[-_.]+", "-", name).lower())
        # A local tag (torch 2.11.0+cu130) is the same release as the lock's 2.11.0.
        if have is None or (have != version and release(have) != version):
            differing += 1
            print(f"{name}: lock {version}, here {have or 'missing'}")
    print(f"{differing} of the lock's packages differ here ({sys.executable})")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
