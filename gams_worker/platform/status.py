"""An opt-in local status endpoint: ``GET http://127.0.0.1:WORKER_STATUS_PORT/status``.

It answers ``{"running_jobs": N, "engine_requests": M, "engine_errored": bool,
"aborted": [{"job_id": id, "at": t}, ...]}``: ``running_jobs`` counts jobs (both dialects)
whose outputs are being produced, ``engine_requests`` counts requests vLLM's output processor still
tracks (an aborted request leaves it at once), ``aborted`` lists the latest jobs whose engine
request was aborted before it finished, with the ``time.monotonic()`` of the abort (on Linux
one clock for all processes of the host, so a test can compare it with its own times).
Tests and benchmarks read it to see that a stopped job freed its engine request; it binds
to 127.0.0.1 only and is off unless WORKER_STATUS_PORT is set.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

log = logging.getLogger(__name__)


def worker_status(engine: Any, running_jobs: int, aborted: Iterable[Tuple[Any, float]]) -> Dict[str, Any]:
    """The figures the endpoint reports: the jobs running (JobRouter.running_jobs), the engine's
    requests and state, and the (job id, time) of the latest aborts (PlainJobs.aborted). It reads
    plain counters, safe from another thread."""
    output_processor = getattr(engine, "output_processor", None)
    engine_requests: Optional[int] = None
    if output_processor is not None:
        engine_requests = output_processor.get_num_unfinished_requests()
    return {
        "running_jobs": running_jobs,
        "engine_requests": engine_requests,
        "engine_errored": bool(engine.errored),
        "aborted": [{"job_id": job_id, "at": at} for job_id, at in list(aborted)],
    }


class StatusServer:
    """Serves what ``report()`` returns (``worker_status``, as gams_worker/worker.py wires it) on
    127.0.0.1:``port`` from a daemon thread."""

    def __init__(self, report: Callable[[], Dict[str, Any]], port: int):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path != "/status":
                    self.send_error(404)
                    return
                body = json.dumps(report()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # one line per poll would flood the log
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="status-server", daemon=True)
        self._thread.start()
        log.info("status endpoint on http://127.0.0.1:%d/status", self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
