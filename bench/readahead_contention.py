"""The weights readahead against the imports on a cold page cache (issue 29): which way of reading lets both end first.

Each variant drops the page cache, starts `import torch` + vLLM's AsyncLLM in a fresh Python (what the worker
imports while its readahead runs) and at the same time reads the model's weight files its own way in this
process. Printed per variant: when torch and vLLM were imported, when the readahead ended, and how long a
second read of the weights then took (what vLLM's loader would still wait for on the disk). Run as root
on the GPU host, from the repo root, with the kit's PYTHONPATH:

    python3 -m bench.readahead_contention MODEL_DIR [--variants alone-imports now chunk-1m ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

from gams_worker.startup.readahead import WeightsReadahead, weight_files

IMPORTS = ("import time; t = time.monotonic(); import torch; print('torch', time.monotonic() - t, flush=True); "
           "from vllm.v1.engine.async_llm import AsyncLLM; print('vllm', time.monotonic() - t, flush=True)")
MIB = 1 << 20


class Variant(NamedTuple):
    chunk: int = 16 * MIB  # bytes per read; 0: no readahead
    rate: float = 0.0  # bytes per second at most; 0: as fast as the disk
    after_torch: bool = False  # start once torch is imported
    idle_io: bool = False  # in the idle I/O class
    imports: bool = True  # torch + vLLM imported beside it


VARIANTS: Dict[str, Variant] = {
    "alone-imports": Variant(chunk=0),
    "alone-readahead": Variant(imports=False),
    "now": Variant(),  # the worker's readahead before its pacing
    "chunk-1m": Variant(chunk=1 * MIB),
    "chunk-256k": Variant(chunk=256 << 10),
    "after-torch": Variant(after_torch=True),
    "rate-2gbps": Variant(rate=2e9),
    "rate-1gbps": Variant(rate=1e9),
    "rate-500mbps": Variant(rate=5e8),
    "ioprio-idle": Variant(idle_io=True),
    "worker": Variant(),  # gams_worker's WeightsReadahead: paced until the imports end
}


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def idle_io_class() -> None:
    """This thread's I/O in the idle class (ioprio_set; honoured by the bfq and mq-deadline schedulers only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    ioprio_set, who_process, idle_class = 251, 1, 3  # x86_64 syscall number, IOPRIO_WHO_PROCESS, IOPRIO_CLASS_IDLE
    if libc.syscall(ioprio_set, who_process, 0, idle_class << 13) != 0:
        print(f"ioprio_set failed: errno {ctypes.get_errno()}", file=sys.stderr)


def read_files(files: List[Path], chunk: int, rate: float = 0.0) -> float:
    buffer = bytearray(chunk)
    total, started = 0, time.monotonic()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while True:
                count = handle.readinto(buffer)
                if not count:
                    break
                total += count
                if rate:
                    ahead = total / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
    return time.monotonic() - started


def run(name: str, files: List[Path]) -> Dict[str, Optional[float]]:
    chunk, rate, after_torch, idle, imports = VARIANTS[name]
    drop_page_cache()
    t0 = time.monotonic()
    marks: Dict[str, Optional[float]] = {"torch_s": None, "imports_s": None, "readahead_end_s": None}
    torch_done = threading.Event()

    worker = WeightsReadahead(str(files[0].parent)) if name == "worker" else None

    def readahead() -> None:
        if after_torch:
            torch_done.wait()
        if idle:
            idle_io_class()
        if worker:  # the worker's own reading, in its own thread
            worker.start()
            while worker.seconds is None:
                time.sleep(0.01)
        else:
            read_files(files, chunk, rate)
        marks["readahead_end_s"] = round(time.monotonic() - t0, 2)

    reader = threading.Thread(target=readahead) if chunk else None
    child = subprocess.Popen([sys.executable, "-c", IMPORTS], stdout=subprocess.PIPE, text=True) if imports else None
    if reader:
        reader.start()
    if child:
        for line in child.stdout:
            what = line.split()[0]
            marks["torch_s" if what == "torch" else "imports_s"] = round(time.monotonic() - t0, 2)
            torch_done.set()
        child.wait()
        if worker:
            worker.imports_done()
    torch_done.set()
    if reader:
        reader.join()
    marks["reread_s"] = round(read_files(files, 16 * MIB), 2)
    return {"variant": name, **marks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out")
    args = parser.parse_args()
    files = weight_files(Path(args.model_dir))
    schedulers = {str(p.parent.parent.name): p.read_text().strip() for p in Path("/sys/block").glob("*/queue/scheduler")}
    print(f"{len(files)} weight files, {sum(f.stat().st_size for f in files) / 1e9:.1f} GB; I/O schedulers: {schedulers}")
    results = []
    for name in args.variants:
        result = run(name, files)
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"schedulers": schedulers, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
