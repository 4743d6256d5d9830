"""One entry point for the benchmarks (they print numbers; they are not tests).

    .venv/bin/python -m bench cpu [options]     # CPU suite: raw engine, handler, SDK + emulator, proxy design
    python -m bench platform [options]          # the worker under the SDK loop vs the raw engine: bursts, Poisson
    python -m bench posts [options]             # CPU per stream POST: the SDK's path vs the worker's (bench/post_cost.py)
    python -m bench gpu bandwidth|run [options] # GPU suite of one graph mode (bench/gpu_suite.py)
    python -m bench gpu-profile [options]       # batch-1 decode step vs the roofline (bench/gpu_profile.py)
    .venv/bin/python -m bench plot [options]    # PNGs of tokens/s vs concurrency from bench/results/*.json
    python -m bench openai --model DIR [...]    # one Responses and one chat job through the worker (bench/openai_session.py)
    .venv/bin/python -m bench input-blocking    # a long prompt beside 32 streams: their chunk gaps (bench/input_blocking.py)

``python -m bench SUITE --help`` shows each suite's options.
"""

from __future__ import annotations

import sys

SUITES = ("cpu", "platform", "posts", "gpu", "gpu-profile", "plot", "openai", "input-blocking")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    suite, rest = argv[0], argv[1:]
    if suite == "cpu":
        from bench import cpu_suite

        cpu_suite.main(rest)
    elif suite == "platform":
        from bench import platform_suite

        platform_suite.main(rest)
    elif suite == "posts":
        from bench import post_cost

        post_cost.main(rest)
    elif suite == "gpu":
        from bench import gpu_suite

        sys.argv = ["python -m bench gpu", *rest]  # gpu_suite parses sys.argv itself
        gpu_suite.main()
    elif suite == "gpu-profile":
        from bench import gpu_profile

        sys.argv = ["python -m bench gpu-profile", *rest]
        gpu_profile.main()
    elif suite == "openai":
        from bench import openai_session

        return openai_session.main(rest)
    elif suite == "input-blocking":
        from bench import input_blocking

        input_blocking.main(rest)
    else:
        from bench import plot

        plot.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
