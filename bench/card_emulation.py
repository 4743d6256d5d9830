"""Smaller cards emulated on the lent GPU: another process holds all but a card's free memory, then the worker
starts through the platform (`python handler.py` under the runpod SDK loop, against the RunPod emulator) with
default settings and serves bursts of streamed jobs.

    python -m bench.card_emulation --model DIR [--cards 24 32 48 full] [--concurrency 1 8 32] [--tokens 256]

Per card: the worker's plan line (and the first job's `engine.plan`), process start -> first job done, and
tok/s per burst (jobs x tokens / first submit -> last result); on a machine of several GPUs each card is
emulated on every one, and the GPU processes left after the worker's SIGTERM are listed (none, for a clean
stop). Printed and written to --out, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench.fast_starts import PROMPTS, ROOT, stop_process_group

# Free memory of each emulated card when idle, GiB: an L4 (22.49 GiB total), an RTX 5090 (31.84), an L40S (44.99).
CARD_FREE_GIB = {"24": 22.0, "32": 31.3, "48": 44.4}
HOLDER = """
import sys, time, torch
torch.cuda.init(); torch.zeros(1, device="cuda")
free, total = torch.cuda.mem_get_info()
held = torch.empty(max(free - int(float(sys.argv[1]) * 2**30), 0), dtype=torch.uint8, device="cuda")
print(f"holding {held.numel() / 2**30:.2f} GiB; free {torch.cuda.mem_get_info()[0] / 2**30:.2f} of "
      f"{total / 2**30:.2f} GiB", flush=True)
time.sleep(86400)
"""


def gpu_count() -> int:
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return max(1, sum(line.startswith("GPU ") for line in listed.splitlines()))


def hold_memory(free_gib: float) -> List[subprocess.Popen]:
    """A process per GPU holding all but ``free_gib`` of its memory; returns once they hold it."""
    holders = []
    for gpu in range(gpu_count()):
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(free_gib)], stdout=subprocess.PIPE, text=True,
                                  process_group=0, env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)})
        print(f"  GPU {gpu}: " + (holder.stdout.readline().strip() or f"the holder exited with {holder.wait()}"),
              flush=True)
        holders.append(holder)
    return holders


def gpu_processes(ignore: List[int], wait_s: float = 30.0) -> List[str]:
    """The GPU's compute processes other than ``ignore`` (the holders), once none are left or after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            listed = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout
        except FileNotFoundError:  # no GPU here (a CPU try)
            return []
        left = [line for line in listed.splitlines() if line.strip() and int(line.split(",")[0]) not in ignore]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def job(tokens: int) -> Dict[str, Any]:
    return {"prompt": PROMPTS[0], "stream": True,
            "sampling_params": {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}}


def wait_all(records: List[Any], proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for record in records:
        while not record.done.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker {'exited' if proc.poll() is not None else 'timed out'}")


def serve(name: str, model: str, args: argparse.Namespace, holders: List[int]) -> Dict[str, Any]:
    """One worker on the GPU as it is now: start, first job, then each burst."""
    from tests.harness.runpod_emulator import RunPodEmulator

    emulator = RunPodEmulator(hold_s=1.0, stop_hold_s=2.0)
    emulator.start()
    preset = {"MODEL_PRESET": args.preset} if args.preset else {}
    env = {**os.environ, "MODEL_NAME": model, **preset, **emulator.worker_env()}
    log_path = Path(args.out).with_name(f"cards-{name}.log")
    row: Dict[str, Any] = {"card": name}
    with open(log_path, "wb") as log:
        spawned = time.monotonic()
        proc = subprocess.Popen([sys.executable, "handler.py"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, process_group=0)
    try:
        [first] = emulator.submit_many([job(args.tokens)])
        wait_all([first], proc, args.start_timeout)
        row["start_s"] = round(first.results[0][0] - spawned, 1)
        outputs = (first.result or {}).get("output") or []
        row["engine_plan"] = next((o["engine"].get("plan") for o in outputs if isinstance(o, dict) and "engine" in o),
                                  None)
        for streams in args.concurrency:
            records = emulator.submit_many([job(args.tokens) for _ in range(streams)])
            wait_all(records, proc, 300)
            seconds = max(r.results[0][0] for r in records) - records[0].submitted_at
            row[f"tok_s_{streams}"] = round(streams * args.tokens / seconds, 1)
    except RuntimeError as exc:
        row["error"] = str(exc)
    finally:
        stop_process_group(proc)  # SIGTERM, as RunPod stops a worker
        emulator.close()
    row["exit_code"] = proc.returncode
    row["gpu_processes_after_stop"] = gpu_processes(holders)
    row.update(log_lines(log_path))
    return row


def log_lines(log_path: Path) -> Dict[str, Optional[str]]:
    """The worker's plan, max_num_seqs and concurrency lines, and its last error line."""
    text = log_path.read_text(errors="replace").splitlines()
    # The worker's lines follow their logger's name ("gams_worker.startup.plan: plan: ..."), vLLM's do not.
    found = {key.strip(": "): next((line[line.rfind(key):].lstrip(": ")[:400] for line in text if key in line), None)
             for key in (": plan:", ": max_num_seqs:", ": concurrency:", "KV cache size")}
    if not found["plan"]:
        found["last_lines"] = "\n".join(text[-5:])
    return found


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="GaMS-9B-shaped weights (bench/gpu_session.sh model)")
    parser.add_argument("--cards", nargs="+", default=["24", "32", "full"], choices=[*CARD_FREE_GIB, "full"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--preset", default="cjvt/GaMS-9B-Instruct", help="MODEL_PRESET ('': none, for a CPU try)")
    parser.add_argument("--start-timeout", type=float, default=240)
    parser.add_argument("--out", default="/tmp/out/cards.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for card in args.cards:
        print(f"== card {card}", flush=True)
        holders = hold_memory(CARD_FREE_GIB[card]) if card != "full" else []
        try:
            rows.append(serve(card, args.model, args, [holder.pid for holder in holders]))
        finally:
            for holder in holders:
                stop_process_group(holder)
        print(json.dumps(rows[-1], indent=1), flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(table(rows, args.concurrency))
    return 0


def table(rows: List[Dict[str, Any]], concurrency: List[int]) -> str:
    head = "| card | start s | " + " | ".join(f"tok/s {c}" for c in concurrency) + " | plan |"
    lines = [head, "|---" * (3 + len(concurrency)) + "|"]
    for row in rows:
        rates = " | ".join(str(row.get(f"tok_s_{c}", "–")) for c in concurrency)
        lines.append(f"| {row['card']} | {row.get('start_s', '–')} | {rates} | {row.get('plan') or row.get('error')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
