"""Local runs of one job (``python handler.py``), as the SDK's local mode does not iterate a generator
handler: each output printed as one JSON line as it arrives, then the aggregate; exit status 1 on an error."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence


def wants_local_run(argv: Sequence[str], on_runpod: bool) -> bool:
    """Mirror the SDK: a local run unless the platform gave a job URL or an API server is asked for."""
    if "--rp_serve_api" in argv:
        return False
    return not on_runpod or "--test_input" in argv


def read_test_job(argv: Sequence[str]) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--test_input", default=None)
    args, _ = parser.parse_known_args(list(argv))
    if args.test_input:
        job = json.loads(args.test_input)
    else:
        job = json.loads(Path("test_input.json").read_text(encoding="utf-8"))
    job.setdefault("id", "local-test")
    return job


async def run_job(handler: Callable, job: Dict[str, Any]) -> List[Dict[str, Any]]:
    outputs = []
    async for output in handler(job):
        outputs.append(output)
        print(json.dumps(output, ensure_ascii=False), flush=True)
    return outputs


def run_local(handler: Callable, argv: Sequence[str]) -> int:
    job = read_test_job(argv)
    print(f"--- local job {job['id']}: {json.dumps(job.get('input'), ensure_ascii=False)}", flush=True)
    outputs = asyncio.run(run_job(handler, job))
    print("--- aggregate output:", flush=True)
    print(json.dumps({"id": job["id"], "output": outputs}, ensure_ascii=False), flush=True)
    failed: Optional[Dict[str, Any]] = next((o for o in outputs if isinstance(o, dict) and "error" in o), None)
    if failed:
        print(f"--- job failed: {failed['error']}", file=sys.stderr, flush=True)
        return 1
    return 0
