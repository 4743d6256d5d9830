"""The import floor: what `import torch` + vLLM's AsyncLLM cost in a fresh Python, and where it goes.

Standard library only, so it runs anywhere the worker's Python runs: the venv, the GPU kit,
or inside the worker image (mount this one file):

    python3 bench/import_floor.py [--repeat 3] [--top 12]            # with the installed bytecode
    python3 bench/import_floor.py --no-bytecode                       # every module compiled from source
    python3 bench/import_floor.py --summarise importtime.txt          # a saved `python -X importtime` log
    podman run --rm --entrypoint python3 -v "$PWD/bench/import_floor.py:/import_floor.py:ro" IMAGE \\
        /import_floor.py --repeat 3                                   # inside the image

Each repeat is a fresh `python -X importtime -c STATEMENT`: its wall time, then for the last
one the slowest imports by cumulative time (what an import pulled in with it) and by self
time (the module's own code). ``--no-bytecode`` points PYTHONPYCACHEPREFIX at an empty folder
and sets PYTHONDONTWRITEBYTECODE, so nothing precompiled is used: the difference to the
default run is what the image's precompiled bytecode saves.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple

STATEMENT = "import torch; from vllm.v1.engine.async_llm import AsyncLLM"


class Import(NamedTuple):
    name: str
    self_s: float
    cumulative_s: float
    depth: int  # 0: imported by the statement itself


def parse_importtime(text: str) -> List[Import]:
    """Lines like ``import time:       512 |      10230 |   vllm.envs``."""
    imports = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|", 2)
        try:
            self_s, cumulative_s = int(self_us) / 1e6, int(cumulative_us) / 1e6
        except ValueError:  # the header line
            continue
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        imports.append(Import(name.strip(), self_s, cumulative_s, depth))
    return imports


def summarise(imports: List[Import], top: int) -> str:
    total = sum(i.self_s for i in imports)
    lines = [f"{len(imports)} modules, {total:.2f} s of import time in all"]
    lines.append(f"slowest by cumulative time (what each import pulled in; depth 0-2 only):")
    shallow = sorted((i for i in imports if i.depth <= 2), key=lambda i: -i.cumulative_s)[:top]
    lines += [f"  {i.cumulative_s:7.2f} s  {'  ' * i.depth}{i.name}" for i in shallow]
    lines.append(f"slowest by self time (the module's own code):")
    lines += [f"  {i.self_s:7.2f} s  {i.name}" for i in sorted(imports, key=lambda i: -i.self_s)[:top]]
    packages: Dict[str, float] = {}
    for i in imports:
        packages[i.name.split(".")[0]] = packages.get(i.name.split(".")[0], 0.0) + i.self_s
    lines.append("self time by top-level package: " + ", ".join(
        f"{name} {seconds:.2f} s" for name, seconds in sorted(packages.items(), key=lambda kv: -kv[1])[:top]))
    return "\n".join(lines)


def run(statement: str, repeat: int, top: int, no_bytecode: bool) -> None:
    env = dict(os.environ)
    label = "installed bytecode"
    if no_bytecode:
        env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="no-pyc-")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        label = "no bytecode (compiled from source)"
    print(f"{sys.executable} -X importtime -c {statement!r}, {repeat} fresh processes, {label}")
    stderr = ""
    for index in range(repeat):
        started, cpu_before = time.perf_counter(), _children_cpu_s()
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], env=env,
                              capture_output=True, text=True)
        wall, cpu = time.perf_counter() - started, _children_cpu_s() - cpu_before
        if done.returncode != 0:
            raise SystemExit(f"the import failed:\n{done.stderr[-3000:]}")
        stderr = done.stderr
        # CPU time is what a busy machine does not inflate; wall time is what a start waits for.
        print(f"  run {index + 1}: {wall:.2f} s wall, {cpu:.2f} s CPU (user + system), process start to exit")
    print(summarise(parse_importtime(stderr), top))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--statement", default=STATEMENT)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--no-bytecode", action="store_true")
    parser.add_argument("--summarise", metavar="FILE", help="summarise a saved -X importtime log instead")
    args = parser.parse_args()
    if args.summarise:
        with open(args.summarise) as handle:
            print(summarise(parse_importtime(handle.read()), args.top))
        return
    run(args.statement, args.repeat, args.top, args.no_bytecode)


if __name__ == "__main__":
    main()
