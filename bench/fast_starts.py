"""Fast starts (issue 17): the worker through the platform against a bare vLLM process, on one host.

    python -m bench.fast_starts worker NAME --results DIR [VAR=value ...]
        `python handler.py` under the real runpod SDK loop against the RunPod emulator; one
        streamed job is queued at process start. Records process start → first job taken,
        first chunk at the emulator and job done, and the worker's start-up timeline.
    python -m bench.fast_starts bare NAME --results DIR [VAR=value ...]
        A bare process: import torch, import AsyncLLM, create it with the worker's engine
        arguments and compile cache folder (same environment, so the same cache), then greedy
        outputs of fixed prompts and throughput at batch 1 and 64 concurrent requests.
    python -m bench.fast_starts stop NAME --results DIR [--after S] [VAR=value ...]
        A start cut short: `python handler.py` as above, SIGTERM to it alone (as a container runtime
        sends it to PID 1) S seconds after vLLM's engine process appeared. Records how long the worker
        took to exit, its exit status, and when the last of its processes was gone.
    python -m bench.fast_starts table --results DIR
        One table of every run in DIR, and whether the bare runs' greedy outputs are equal.
    python -m bench.fast_starts evict PATH...
        Drops the page cache (all of it where this process may, else each file under PATH), so that
        the next start reads from disk as a baked image's first start does.

``--root DIR`` runs another checkout's worker (main's, beside this branch's) with this bench.

Each command writes DIR/NAME.json. ``VAR=value`` arguments set the run's environment
(VLLM_USE_MEGA_AOT_ARTIFACT=0, ...) on top of this process's.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Kaj je vredno videti v Ljubljani?",
    "Napiši kratko pesem o Triglavu.",
    "Razloži, kako deluje fotosinteza.",
    "Kdo je bil France Prešeren?",
]
START_TIMEOUT_S = 600


def parse_assignments(items: List[str]) -> Dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected VAR=value, got {item!r}")
        env[name] = value
    return env


# --- the worker, through the platform ------------------------------------------------------


def start_worker(log_path: Path, env_overrides: Dict[str, str], root: Path) -> Tuple[Any, subprocess.Popen, float]:
    """The RunPod emulator, and `python handler.py` of ``root`` polling it (its output in ``log_path``); when
    the worker was spawned."""
    sys.path.insert(0, str(ROOT))
    from tests.harness.runpod_emulator import RunPodEmulator

    emulator = RunPodEmulator(hold_s=1.0, stop_hold_s=2.0)
    emulator.start()
    env = {**os.environ, **env_overrides, **emulator.worker_env()}
    with open(log_path, "wb") as log:
        spawned = time.monotonic()
        # Own process group (for the clean-up), same session (a new session is a new scheduler group).
        proc = subprocess.Popen([sys.executable, "handler.py"], cwd=root, env=env, stdout=log,
                                stderr=subprocess.STDOUT, process_group=0)
    return emulator, proc, spawned


def worker_run(name: str, results: Path, env_overrides: Dict[str, str], tokens: int, root: Path) -> Dict[str, Any]:
    log_path = results / f"{name}.log"
    emulator, proc, spawned = start_worker(log_path, env_overrides, root)
    job_id = emulator.submit({"prompt": PROMPTS[0], "stream": True,
                              "sampling_params": {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}})
    record = emulator.jobs[job_id]
    try:
        while not record.done.wait(0.2):
            if proc.poll() is not None:
                raise SystemExit(f"{name}: the worker exited with {proc.returncode}; log: {log_path}")
            if time.monotonic() - spawned > START_TIMEOUT_S:
                raise SystemExit(f"{name}: no result in {START_TIMEOUT_S} s; log: {log_path}")
    finally:
        stop_process_group(proc)
        emulator.close()
    if not record.chunks or "output" not in (record.result or {}):
        raise SystemExit(f"{name}: the job failed: {record.result}; log: {log_path}")
    outputs = record.result["output"]
    startup = next((out["startup"] for out in outputs if isinstance(out, dict) and "startup" in out), None)
    # The greedy text, so that starts in other graph modes or from other caches can be compared.
    text = "".join(choice.get("text", "") for out in outputs if isinstance(out, dict)
                   for choice in out.get("choices", ()))
    return {
        "kind": "worker",
        "name": name,
        "env": env_overrides,
        "first_take_s": round(record.taken_at[0] - spawned, 2),
        "first_chunk_s": round(record.chunks[0][0] - spawned, 2),
        "job_done_s": round(record.results[0][0] - spawned, 2),
        "startup": startup,
        "output_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "engine_mode": next((out["engine"]["mode"] for out in outputs if isinstance(out, dict) and "engine" in out),
                            None),
    }


def stop_run(name: str, results: Path, env_overrides: Dict[str, str], after_s: float, root: Path) -> Dict[str, Any]:
    import psutil

    log_path = results / f"{name}.log"
    emulator, proc, spawned = start_worker(log_path, env_overrides, root)
    try:
        worker = psutil.Process(proc.pid)
        while not any(_is_engine_process(child) for child in worker.children(recursive=True)):
            if proc.poll() is not None or time.monotonic() - spawned > START_TIMEOUT_S:
                raise SystemExit(f"{name}: no engine process before the worker ended; log: {log_path}")
            time.sleep(0.05)
        engine_at = time.monotonic()
        time.sleep(after_s)
        processes = [worker, *worker.children(recursive=True)]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(60)
        exited = time.monotonic()
        while _alive(processes) and time.monotonic() - exited < 60:
            time.sleep(0.01)
        gone = None if _alive(processes) else time.monotonic()  # None: some still ran a minute after the exit
    finally:
        stop_process_group(proc)
        emulator.close()
    return {"kind": "stop", "name": name, "env": env_overrides, "engine_process_at_s": round(engine_at - spawned, 2),
            "sigterm_at_s": round(sent - spawned, 2), "returncode": returncode, "exit_s": round(exited - sent, 3),
            "all_processes_gone_s": gone and round(gone - sent, 3), "processes_at_sigterm": len(processes)}


def _is_engine_process(process: Any) -> bool:
    """vLLM's engine process: spawned (multiprocessing's spawn_main), then titled VLLM::EngineCore."""
    import psutil

    try:
        command = " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie
        return False
    return "EngineCore" in command or "spawn_main" in command


def _alive(processes: List[Any]) -> List[Any]:
    """Those of ``processes`` still running (a zombie has ended: only its parent's wait is left)."""
    import psutil

    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def stop_process_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# --- the bare process ----------------------------------------------------------------------


def bare_run(name: str, results: Path, tokens: int, root: Path) -> Dict[str, Any]:
    """Runs in this process: the environment was set before Python started (see main())."""
    started = time.time()
    import torch  # noqa: F401

    torch_at = time.time()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    classes_at = time.time()
    sys.path.insert(0, str(root))
    from gams_worker.startup.output_capture import OutputCapture
    from gams_worker.startup.timeline import StartupTimeline, process_start_time

    process_start = process_start_time()

    kwargs = worker_engine_kwargs()  # outside the timed steps: the doctor and cache choice of the worker
    timeline = StartupTimeline(started_at=process_start)
    created = time.time()
    with OutputCapture(on_line=timeline.watch_engine_line) as capture:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    created_at = time.time()
    timeline.read_engine_output(capture.text(settle_s=0.1, max_wait_s=1.0))
    try:
        import asyncio

        generated = asyncio.run(generate(engine, tokens))
    finally:
        engine.shutdown()
    return {
        "kind": "bare",
        "name": name,
        "env": {k: os.environ[k] for k in ("VLLM_USE_MEGA_AOT_ARTIFACT", "VLLM_CACHE_ROOT")
                if k in os.environ},
        "python_start_s": round(started - process_start, 2),
        "import_torch_s": round(torch_at - started, 2),
        "import_asyncllm_s": round(classes_at - torch_at, 2),
        "imports_s": round(classes_at - process_start, 2),
        "engine_creation_s": round(created_at - created, 2),
        "served_engine_at_s": round(created_at - process_start, 2),
        "engine_phases_s": timeline.engine_phases,
        "vllm_marks_s": timeline.to_output()["since_process_start_s"],
        **generated,
    }


def worker_engine_kwargs() -> Dict[str, Any]:
    """The engine arguments the worker would start with in this environment (and its environment for vLLM)."""
    from gams_worker.config import export_to_engine, load_config
    from gams_worker.startup.engine import engine_kwargs
    from gams_worker.startup.model import find_local_model
    from gams_worker.startup.plan import engine_ready_timeout, plan_engine

    config = load_config()
    export_to_engine(engine_ready_timeout(config))  # a factor of vLLM's compile-cache hash: the worker's cache
    plan = plan_engine(config, find_local_model(config))
    return engine_kwargs(plan.config, plan.mode, plan.model_path)


async def generate(engine: Any, tokens: int) -> Dict[str, Any]:
    """Greedy token ids of PROMPTS, then tokens/s at batch 1 and at 64 concurrent requests."""
    import asyncio
    import uuid

    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    tokenizer = engine.get_tokenizer()

    async def one(prompt: str, params: SamplingParams) -> List[int]:
        ids: List[int] = []
        async for output in engine.generate({"prompt_token_ids": tokenizer.encode(prompt)}, params, uuid.uuid4().hex):
            ids.extend(output.outputs[0].token_ids)
        return ids

    greedy = SamplingParams(max_tokens=128, temperature=0.0, output_kind=RequestOutputKind.DELTA)
    greedy_ids = [await one(prompt, greedy) for prompt in PROMPTS]
    fixed = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    await asyncio.gather(*(one(PROMPTS[0], fixed) for _ in range(4)))  # warm-up
    rates = {}
    for concurrency, repeats in ((1, 3), (64, 2), (256, 1)):
        best = 0.0
        for _ in range(repeats):
            started = time.perf_counter()
            runs = await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)], fixed) for i in range(concurrency)))
            best = max(best, sum(len(ids) for ids in runs) / (time.perf_counter() - started))
        rates[f"c{concurrency}_tok_s"] = round(best, 1)
    return {"greedy_token_ids": greedy_ids, "throughput": rates, "throughput_tokens_per_request": tokens}


def evict(paths: List[str]) -> str:
    """Drop the page cache: all of it where allowed, else every file under ``paths`` (posix_fadvise)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return "page cache dropped (/proc/sys/vm/drop_caches)"
    except OSError as exc:
        refused = exc
    count = 0
    for top in paths:
        for folder, _, names in os.walk(top):
            for file_name in names:
                try:
                    fd = os.open(os.path.join(folder, file_name), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    count += 1
                finally:
                    os.close(fd)
    return f"drop_caches refused ({refused!r}): evicted {count} files under {' '.join(paths)} (POSIX_FADV_DONTNEED)"


# --- the table -----------------------------------------------------------------------------


def table(results: Path) -> str:
    runs = [json.loads(path.read_text()) for path in sorted(results.glob("*.json"), key=lambda p: p.stat().st_mtime)]
    lines = []
    workers = [run for run in runs if run["kind"] == "worker"]
    if workers:
        lines += ["Worker, process start → first chunk at the emulator, split into parts that add up to it (s)", "",
                  "| run | first chunk | Python + handler | imports: torch + vLLM classes | our steps | engine start "
                  "| engine started → first chunk | vLLM: weights / compile / graphs / KV+warm-up |",
                  "|---|---|---|---|---|---|---|---|"]
        for run in workers:
            startup = run.get("startup") or {}
            marks = startup.get("since_process_start_s", {})
            phases = startup.get("engine_phases_s", {})
            at = {name: marks.get(name, 0.0) for name in (
                "config loaded", "vLLM engine classes imported", "compile cache checked", "engine started")}
            # The imports follow the config (and the local model lookup, a few stat calls); our steps
            # (presets, doctor, model, compile cache) come between the imports and the engine start.
            parts = [at["config loaded"],
                     at["vLLM engine classes imported"] - at["config loaded"],
                     at["compile cache checked"] - at["vLLM engine classes imported"],
                     at["engine started"] - at["compile cache checked"],
                     run["first_chunk_s"] - at["engine started"]]
            cells = [run["name"], _s(run["first_chunk_s"])] + [_s(part) for part in parts]
            cells.append(" / ".join(_s(phases.get(p)) for p in ("weights_loaded_s", "compiled_s", "graphs_captured_s",
                                                                "kv_allocated_and_warmed_s")))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Each worker's steps (seconds since the mark before):"]
        for run in workers:
            steps = (run.get("startup") or {}).get("step_s", {})
            lines.append(f"- {run['name']}: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in steps.items()))
    stops = [run for run in runs if run["kind"] == "stop"]
    if stops:
        lines += ["", "SIGTERM during the start (s)", "", "| run | engine process at | SIGTERM at | worker exit "
                  "(status) | all its processes gone |", "|---|---|---|---|---|"]
        lines += [f"| {run['name']} | {_s(run['engine_process_at_s'])} | {_s(run['sigterm_at_s'])} | "
                  f"{run['exit_s']:.2f} ({run['returncode']}) | {_gone(run['all_processes_gone_s'])} |" for run in stops]
    bares = [run for run in runs if run["kind"] == "bare"]
    if bares:
        lines += ["", "Bare process (import torch + AsyncLLM, create it) beside the worker, same host (s)",
                  "", "| run | import torch + AsyncLLM | engine creation, warm cache | torch.compile part "
                  "| served engine at | throughput b1 / c64 / c256 (tok/s) |", "|---|---|---|---|---|---|"]
        for run in bares:
            lines.append(f"| {run['name']} | {_s(run['imports_s'])} | {_s(run['engine_creation_s'])} | "
                         f"{_s(run['engine_phases_s'].get('compiled_s'))} | {_s(run['served_engine_at_s'])} | "
                         f"{run['throughput']['c1_tok_s']} / {run['throughput']['c64_tok_s']} / "
                         f"{run['throughput'].get('c256_tok_s', '–')} |")
        reference = bares[0]
        for run in bares[1:]:
            lines.append(f"greedy outputs {run['name']} vs {reference['name']}: "
                         + compare_greedy(reference["greedy_token_ids"], run["greedy_token_ids"]))
    return "\n".join(lines)


def compare_greedy(first: List[List[int]], second: List[List[int]]) -> str:
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"DIFFER: prompt {index} from token {at} ({len(a)} and {len(b)} tokens)"
    if len(first) != len(second):
        return "DIFFER: not the same number of prompts"
    return f"token-for-token equal ({sum(len(ids) for ids in first)} tokens, {len(first)} prompts)"


def _gone(seconds: Optional[float]) -> str:
    return "some still ran a minute after the exit" if seconds is None else f"{seconds:.2f}"


def _s(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}"


# --- entry ---------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("worker", "bare", "stop", "table", "evict"))
    parser.add_argument("name", nargs="?")
    parser.add_argument("env", nargs="*", help="VAR=value for the run")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per request (worker job, throughput)")
    parser.add_argument("--after", type=float, default=0.0,
                        help="stop: seconds from the engine process's appearance to the SIGTERM")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose worker runs")
    parser.add_argument("--results", type=Path, required=False)
    args = parser.parse_intermixed_args(argv)
    if args.command == "evict":
        print(evict([args.name, *args.env]))
        return 0
    if args.results is None:
        parser.error("--results DIR is needed")
    args.results.mkdir(parents=True, exist_ok=True)
    if args.command == "table":
        print(table(args.results))
        return 0
    if not args.name:
        parser.error("a run needs a NAME")
    overrides = parse_assignments(args.env)
    if args.command == "bare" and any(os.environ.get(k) != v for k, v in overrides.items()):
        # vLLM and the worker's config read the environment: start again with it set.
        env = {**os.environ, **overrides}
        return subprocess.call([sys.executable, "-m", "bench.fast_starts", *(argv or sys.argv[1:])], cwd=ROOT, env=env)
    root = args.root.resolve()
    if args.command == "worker":
        result = worker_run(args.name, args.results, overrides, args.tokens, root)
    elif args.command == "stop":
        result = stop_run(args.name, args.results, overrides, args.after, root)
    else:
        result = bare_run(args.name, args.results, args.tokens, root)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k not in ("greedy_token_ids", "startup")}
    if result.get("startup"):
        summary["step_s"] = result["startup"]["step_s"]
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
