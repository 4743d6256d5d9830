"""The one guard over the runpod SDK release that job_loop.py and poster.py replace parts of: on any
other the worker refuses to start. Read from package metadata, without importing the SDK."""

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
            f"runpod {installed} is installed, but gams_worker/platform/job_loop.py and poster.py replace parts of "
            f"runpod {SDK_VERSION}: install runpod=={SDK_VERSION} (requirements-runpod.txt), or compare that "
            f"release's rp_scale.py, rp_job.py and rp_http.py with {installed}'s and update them and SDK_VERSION")
