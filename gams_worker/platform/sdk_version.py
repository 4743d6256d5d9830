"""The one guard over the runpod SDK version that gams_worker/platform/job_loop.py and poster.py were written for.

job_loop.py replaces the SDK's ``get_jobs``, ``run_jobs`` and ``monitor_stop_signals`` with code read
from one release's ``rp_scale.py``, and poster.py its ``rp_job.handle_job`` and ``rp_http`` posts. On
any other release the rest (set_scale, handle_job, stop signals, what a post sends) may have changed
under them, so the worker refuses to start instead of running a half-patched loop. This module reads the installed version from the package metadata without
importing the SDK (seconds), so ``handler.py`` can refuse before the engine starts.
"""

from __future__ import annotations

from importlib import metadata
from typing import Optional

from gams_worker.errors import WorkerError

SDK_VERSION = "1.12.0"  # the runpod release whose rp_scale.py, rp_job.py and rp_http.py we replace parts of


class SdkVersionError(WorkerError):
    """The installed runpod SDK is not the release the job loop was written for."""


def check_sdk_version(installed: Optional[str] = None) -> None:
    """Raise SdkVersionError unless runpod ``SDK_VERSION`` is installed (or ``installed`` is it)."""
    if installed is None:
        try:
            installed = metadata.version("runpod")
        except metadata.PackageNotFoundError:
            installed = "none"
    if installed != SDK_VERSION:
        raise SdkVersionError(
            f"runpod {installed} is installed, but the job loop (gams_worker/platform/job_loop.py) replaces "
            f"get_jobs and run_jobs of runpod {SDK_VERSION}; install runpod=={SDK_VERSION} "
            f"(requirements-runpod.txt), or compare that release's serverless/modules/rp_scale.py, rp_job.py "
            f"and rp_http.py with runpod {installed}'s, update job_loop.py, poster.py and SDK_VERSION")
