"""One /v1/responses job and one chat job through the worker, with the official openai client.

``python handler.py`` runs under the real runpod SDK job loop against the platform emulator
(tests/harness/runpod_emulator.py); the client talks to the emulator's OpenAI surface
(tests/harness/openai_proxy.py), as it would to ``https://api.runpod.ai/v2/<id>/openai/v1``.
It prints each output as JSON and the worker's start-up lines about stop tokens, the chat
template, the KV cache and the OpenAI routes. A check of the wiring, not a benchmark:

    python -m bench openai --model /tmp/gams-9b-shaped --preset cjvt/GaMS-9B-Instruct   # GPU
    .venv/bin/python -m bench openai --model "$(.venv/bin/python -m builder.tiny_model)" \\
        --env GPU_MEMORY_UTILIZATION=0.2 MAX_MODEL_LEN=512                          # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

START_TIMEOUT_S = 900
WORKER_LINES = ("stop tokens", "lacks the chat template", "chat template:", "KV cache:", "OpenAI routes ready",
                "settings:", "engine started in")
QUESTION = "Kaj je vredno videti v Ljubljani?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench openai", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--preset", help="MODEL_PRESET, e.g. cjvt/GaMS-9B-Instruct for GaMS-shaped weights")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--log", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "openai-session.log",
                        help="the worker's output goes to this path's .stdout and .stderr")
    parser.add_argument("--env", nargs="*", default=[], help="more worker settings, VAR=value")
    args = parser.parse_args(argv)

    import openai

    from tests.harness.openai_proxy import OpenAIProxy
    from tests.harness.runpod_emulator import RunPodEmulator
    from tests.harness.worker_process import WorkerProcess, subprocess_env

    emulator = RunPodEmulator(hold_s=1.0)
    emulator.start()
    proxy = OpenAIProxy(emulator, job_timeout_s=START_TIMEOUT_S)
    base_url = proxy.start()
    env = subprocess_env(**emulator.worker_env(), MODEL_NAME=args.model, SERVED_MODEL_NAME="gams",
                         **({"MODEL_PRESET": args.preset} if args.preset else {}),
                         **dict(item.split("=", 1) for item in args.env))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(env, args.log.parent, args.log.stem)  # its output in .stdout and .stderr files
    started = time.monotonic()
    try:
        client = openai.OpenAI(base_url=base_url, api_key="emulated", max_retries=0, timeout=START_TIMEOUT_S)
        # The first request waits in the emulator's queue until the worker takes it.
        response = client.responses.create(model="gams", input=QUESTION, temperature=0,
                                           max_output_tokens=args.max_tokens)
        print(f"== worker up and first job served after {time.monotonic() - started:.1f} s")
        print("== /v1/responses:", json.dumps(response.model_dump(mode="json"), ensure_ascii=False))
        events = list(client.responses.create(model="gams", input=QUESTION, temperature=0,
                                              max_output_tokens=args.max_tokens, stream=True))
        streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        print(f"== /v1/responses stream: {len(events)} events, {events[0].type} ... {events[-1].type}; "
              f"text equals the non-stream text: {streamed == response.output_text}")
        chat = client.chat.completions.create(model="gams", messages=[
            {"role": "system", "content": "Odgovarjaj kratko."}, {"role": "user", "content": QUESTION}],
            temperature=0, max_tokens=args.max_tokens)
        print("== /v1/chat/completions:", json.dumps(chat.model_dump(mode="json"), ensure_ascii=False))
        return 0
    finally:
        worker.terminate(timeout=60)
        proxy.close()
        emulator.close()
        print(f"== worker log lines ({worker.stderr_path}):")
        for line in (worker.stdout() + worker.stderr()).splitlines():
            if any(key in line for key in WORKER_LINES):
                print("  ", line[:400])


if __name__ == "__main__":
    sys.exit(main())
