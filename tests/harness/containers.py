"""The worker's image built and run with podman, for tests/test_container_*.py.

Two images come from the one Dockerfile (scripts/container-setup.sh installs podman and makes
the local base images first; no registry serves any here):

- ``GPU_IMAGE``: the GPU image exactly, on a stand-in for the CUDA base (Debian trixie and its
  Python 3.13; Debian has no 3.12), installing requirements.lock.
- ``CPU_IMAGE``: the same Dockerfile on Debian bookworm's Python 3.11 with requirements-cpu.lock
  (the CPU test environment) and the tiny test model baked by the bake stage from the local fake hub.

Builds keep podman's layer cache and pip's cache mount, so a rebuild with unchanged inputs takes
seconds. Containers run in a network namespace of their own that has only a loopback device:
the RunPod emulator listens there too (``in_netns``), and nothing else is reachable.

    python -m tests.harness.containers build gpu|cpu     # build one image, print the seconds
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from signal import SIGKILL
from typing import Callable, Dict, Iterator, List, Optional, TypeVar

ROOT = Path(__file__).resolve().parent.parent.parent
GPU_IMAGE = "localhost/gams-worker:gpu-standin"
CPU_IMAGE = "localhost/gams-worker:cpu-test"
STAND_IN_CUDA = "localhost/stand-in/cuda:13.0.2-base"  # scripts/container-setup.sh
STAND_IN_DEBIAN = "localhost/stand-in/debian:bookworm"
# torch 2.13.0+cpu is on no index this machine reaches: the machine's wheel folder has it
# (where there is none, PIP_EXTRA_INDEX_URL names an index that has it).
CPU_WHEELS = Path("/opt/wheels")
# The tiny model as a hub repo. The fake hub's port is fixed because it is a build argument:
# a new port per run would rebuild the bake layer and with it everything after it.
TINY_REPO = "gams-test/tiny"
FAKE_HUB_PORT = 18765
BUILD_TIMEOUT_S = 3600
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class ContainerError(AssertionError):
    """A podman command failed; the message carries its output."""


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise ContainerError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def require_podman() -> None:
    if shutil.which("podman") is None:
        raise ContainerError("podman is missing: run scripts/container-setup.sh (scripts/test.sh does)")
    for base in (STAND_IN_CUDA, STAND_IN_DEBIAN):
        if podman("image", "exists", base, check=False).returncode != 0:
            raise ContainerError(f"base image {base} is missing: run scripts/container-setup.sh")


def ca_bundle() -> Optional[Path]:
    """The CA bundle pip needs on this machine (a TLS-intercepting proxy), if it is told of one."""
    configured = os.environ.get("PIP_CERT")
    if not configured:
        result = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                                capture_output=True, text=True)
        configured = result.stdout.strip() if result.returncode == 0 else ""
    return Path(configured) if configured and Path(configured).is_file() else None


def build(tag: str, build_args: Dict[str, str], log_path: Path,
          build_contexts: Optional[Dict[str, Path]] = None) -> float:
    """``podman build`` the Dockerfile's worker target; returns the seconds it took."""
    command = ["podman", "build", "--pull=never", "--layers", "--target", "worker", "--tag", tag,
               # the bake step reaches the fake hub on this machine's loopback
               "--network=host"]
    for name, value in build_args.items():
        command += ["--build-arg", f"{name}={value}"]
    for name, path in (build_contexts or {}).items():
        command += ["--build-context", f"{name}={path}"]
    bundle = ca_bundle()
    if bundle:  # mounted for the pip steps only, never in a layer
        command += ["--secret", f"id=cacert,src={bundle}"]
    command.append(str(ROOT))
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise ContainerError(f"building {tag} failed after {seconds:.0f} s (exit {result.returncode}):\n"
                             + log_path.read_text(errors="replace")[-6000:])
    return seconds


def build_gpu_image(log_path: Path) -> float:
    return build(GPU_IMAGE, {"BASE_IMAGE": STAND_IN_CUDA, "PYTHON": "python3.13"}, log_path)


def build_cpu_image(log_path: Path) -> float:
    """The CPU image with the tiny model baked from the fake hub at its content's commit."""
    from builder import tiny_model
    from tests.harness.fake_hub import FakeHub, model_files

    hub = FakeHub(port=FAKE_HUB_PORT)
    try:
        commit = hub.add_repo(TINY_REPO, model_files(tiny_model.build()))
        args = {"BASE_IMAGE": STAND_IN_DEBIAN, "PYTHON": "python3.11", "LOCK": "requirements-cpu.lock",
                "MODEL_NAME": TINY_REPO, "MODEL_REVISION": commit, "HF_ENDPOINT": hub.url,
                "SYSTEM_PACKAGES": "libnuma1"}
        contexts = {}
        if CPU_WHEELS.is_dir():
            contexts["wheels"] = CPU_WHEELS
        elif os.environ.get("PIP_EXTRA_INDEX_URL"):  # elsewhere, e.g. PyTorch's CPU index (tests.yml)
            args["TORCH_INDEX"] = os.environ["PIP_EXTRA_INDEX_URL"]
        return build(CPU_IMAGE, args, log_path, build_contexts=contexts)
    finally:
        hub.close()


# --- network namespaces -------------------------------------------------------------


@contextlib.contextmanager
def loopback_netns() -> Iterator[Path]:
    """A new network namespace with only a loopback device, up; removed afterwards."""
    name = f"gams-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def in_netns(netns: Path, call: Callable[[], T]) -> T:
    """``call()`` in a thread that joined ``netns``: sockets it opens, and threads it starts
    (such as the emulator's server thread), live in that namespace. Other threads are untouched."""
    outcome: List = []

    def enter_and_call() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({netns})")
            finally:
                os.close(fd)
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=enter_and_call, name="in-netns")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


# --- containers ---------------------------------------------------------------------


class Container:
    """One ``podman run`` of an image in a network namespace; logs and exit via podman."""

    def __init__(self, image: str, env: Dict[str, str], netns: Path, name_prefix: str = "gams-test"):
        self.name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
        args = ["run", "--detach", "--name", self.name, "--network", f"ns:{netns}", "--shm-size=1g"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        podman(*args, image)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def tail(self, chars: int = 4000) -> str:
        return f"--- container {self.name} log:\n{self.logs()[-chars:]}"

    def running(self) -> bool:
        result = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return result.stdout.strip() == "true"

    def exit_code(self) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())

    def signal(self, name: str) -> None:
        if name == "KILL":
            # As the host kills a worker, and not with `podman kill`: after SIGKILL podman 4.3 waits
            # only 5 s for conmon's exit file, then records exit code -1 and exits 125 (in CI the
            # worker, an engine holding GBs on 2 busy cores, took longer). Sent directly, conmon
            # records the real exit status whenever it comes; wait() reads it.
            os.kill(int(podman("inspect", "--format", "{{.State.Pid}}", self.name).stdout), SIGKILL)
        else:
            podman("kill", "--signal", name, self.name)

    def wait(self, timeout: float) -> int:
        """The exit code, once the container has stopped."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise ContainerError(f"{self.name} still running after {timeout} s\n{self.tail()}")
            time.sleep(0.1)
        return self.exit_code()

    def restart(self) -> None:
        """Start the stopped container again: same writable layer, same environment."""
        podman("start", self.name)

    def exec(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, timeout=timeout, check=False)

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False, timeout=60)


def run_once(image: str, *command: str, env: Optional[Dict[str, str]] = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """``podman run --rm --network=none image command``: output and exit code."""
    args = ["run", "--rm", "--network=none"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    return podman(*args, image, *command, timeout=timeout, check=False)


def main(argv: List[str]) -> int:
    if len(argv) != 2 or argv[0] != "build" or argv[1] not in ("gpu", "cpu"):
        print(__doc__, file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    require_podman()
    log_path = Path(f"/tmp/gams-build-{argv[1]}.log")
    seconds = (build_gpu_image if argv[1] == "gpu" else build_cpu_image)(log_path)
    print(f"built {GPU_IMAGE if argv[1] == 'gpu' else CPU_IMAGE} in {seconds:.0f} s (log: {log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
