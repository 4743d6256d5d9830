"""The opt-in local status endpoint, ``GET http://127.0.0.1:WORKER_STATUS_PORT/status``, for tests
and benchmarks: the jobs running, the engine's requests and state, the latest aborts (MAINTAINERS.md)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, Tuple

from gams_worker.serving.watchdog import unfinished_requests

log = logging.getLogger(__name__)


def worker_status(engine: Any, running_jobs: int, aborted: Iterable[Tuple[Any, float]]) -> Dict[str, Any]:
    """What the endpoint reports, read from plain counters (safe from any thread); ``at`` is the
    ``time.monotonic()`` of the abort, one clock for the whole host on Linux."""
    return {
        "running_jobs": running_jobs,
        "engine_requests": unfinished_requests(engine),
        "engine_errored": bool(engine.errored),
        "aborted": [{"job_id": job_id, "at": at} for job_id, at in list(aborted)],
    }


class StatusServer:
    """Serves what ``report()`` returns on 127.0.0.1:``port`` from a daemon thread."""

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
        threading.Thread(target=self._server.serve_forever, name="status-server", daemon=True).start()
        log.info("status endpoint on http://127.0.0.1:%d/status", self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
