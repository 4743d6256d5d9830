"""The GPU image's Dockerfile, built with podman on a stand-in for the CUDA base, every step proven.

The stand-in (scripts/container-setup.sh) is Debian trixie with its Python 3.13 where the real
base is Ubuntu 24.04 with 3.12: Debian has no 3.12, and no registry serves the CUDA image here.
Every other step is the GPU image's own: the lock installed --no-deps, pip check with the one
accepted conflict, the drift guard (gams_worker/startup/vllm_release.py) on vLLM 0.32.0 (CUDA 13.0
build), FlashInfer off as in every GPU run, the worker refusing to start without a GPU with the
doctor's words. The first build downloads ~4.5 GB of wheels; podman's
layer cache and pip's cache mount make a rebuild with unchanged pins take seconds.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.harness.containers import GPU_IMAGE, build_gpu_image, podman, require_podman, run_once
from tests.test_lock import lock_pins

pytestmark = pytest.mark.container


@pytest.fixture(scope="module")
def gpu_image(tmp_path_factory):
    require_podman()
    log_path = tmp_path_factory.mktemp("gpu-image") / "build.log"
    seconds = build_gpu_image(log_path)
    print(f"\n[container] GPU image (stand-in base) built in {seconds:.0f} s; log {log_path}", file=sys.stderr)
    return GPU_IMAGE


def python_in(image: str, code: str, **env: str):
    return run_once(image, "python", "-c", code, env=env)


def test_the_image_holds_exactly_the_lock(gpu_image):
    result = python_in(gpu_image, "import json, importlib.metadata as m; print(json.dumps("
                                  "{d.metadata['Name']: d.version for d in m.distributions()}))")
    assert result.returncode == 0, result.stderr
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    installed = {canonicalize_name(name): Version(version) for name, version in json.loads(result.stdout).items()}
    installed.pop("pip")  # the venv's own
    assert installed == lock_pins()


def test_pip_check_finds_only_the_accepted_runpod_fastapi_conflict(gpu_image):
    result = run_once(gpu_image, "python", "/tmp/check_install.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "runpod 1.12.0 has requirement fastapi[all]>=0.141.1" in result.stdout, result.stdout


def test_vllm_and_runpod_import_and_the_job_loop_does_not_load_fastapi(gpu_image):
    """The accepted conflict is harmless: runpod's job loop runs without ever importing fastapi."""
    code = ("import sys, vllm, runpod, torch; import runpod.serverless.worker; "
            "from runpod.serverless.modules import rp_scale, rp_job, rp_ping; "
            "print(vllm.__version__, runpod.__version__, torch.__version__, torch.version.cuda, "
            "'fastapi' in sys.modules)")
    result = python_in(gpu_image, code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["0.32.0", "1.12.0", "2.13.0+cu130", "13.0", "False"]


def test_the_drift_guard_passes_on_the_images_vllm(gpu_image):
    """The image build ran it too (a Dockerfile step); here against the worker's code as shipped."""
    result = run_once(gpu_image, "python", "-m", "gams_worker.startup.vllm_release")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vLLM 0.32.0: the " in result.stdout and "are all there" in result.stdout


def test_flashinfer_is_off_as_in_every_gpu_run(gpu_image):
    """vLLM installs FlashInfer without its kernels; with no nvcc on the path vLLM does not use it
    (the GPU kit leaves it out, so the H200 runs measured the same). MAINTAINERS.md: "FlashInfer in the image"."""
    result = python_in(gpu_image, "from vllm.utils.flashinfer import has_flashinfer, has_flashinfer_cubin; "
                                  "import importlib.util as u; print(u.find_spec('flashinfer') is not None, "
                                  "has_flashinfer_cubin(), has_flashinfer())")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["True", "False", "False"]


def test_image_settings_for_the_gpu(gpu_image):
    env = dict(item.split("=", 1) for item in json.loads(
        podman("image", "inspect", "--format", "{{json .Config.Env}}", gpu_image).stdout))
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"  # the sampler every GPU measurement used
    assert env["RUNPOD_MIN_CUDA_VERSION"] == "13.0"
    assert "HF_HUB_ENABLE_HF_TRANSFER" not in env
    command = json.loads(podman("image", "inspect", "--format", "{{json .Config.Cmd}}", gpu_image).stdout)
    assert command == ["python", "handler.py"]


def test_the_worker_without_a_gpu_exits_1_with_the_doctors_message(gpu_image):
    # As RunPod would start it, but with no GPU and no network.
    result = run_once(gpu_image, "python", "handler.py", env={"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true"})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    # The doctor's verdict, on the worker's one closing line.
    assert any(line.startswith("gams-worker: ") and "no NVIDIA GPU is visible" in line
               for line in output.splitlines()), output[-4000:]
    assert "Device string must not be empty" not in output


# What MAINTAINERS.md "Hosts the image runs on" says of the run-time compilers, read in the image itself.
RUN_TIME_COMPILERS = r'''
import json, os, re, shutil, subprocess
import torch
from triton import knobs
from flashinfer.compilation_context import CompilationContext

def release(path):
    if not os.path.exists(path):
        return None
    return re.search(r"release (\d+\.\d+)", subprocess.check_output([path, "--version"], text=True)).group(1)

os.environ["FLASHINFER_CUDA_ARCH_LIST"] = "8.0 8.6 8.9 9.0 10.0 12.0"
print(json.dumps({
    "flashinfer_gencode": [f for f in CompilationContext().get_nvcc_flags_list() if f.startswith("-gencode")],
    "ptxas": {
        # Inductor's compile workers point Triton here where torch ships one (torch 2.11 did; 2.13 does not).
        "torch": release(os.path.join(os.path.dirname(torch.__file__), "_inductor", "bin", "ptxas")),
        "triton": release(knobs.nvidia.ptxas.path),
        "triton-blackwell": release(knobs.nvidia.ptxas_blackwell.path),
    },
    "nvcc_on_path": shutil.which("nvcc"),
    "cuda_home": os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"),
    "torch_cuda": torch.version.cuda,
}))
'''


def test_run_time_compilers_give_the_driver_nothing_newer_than_cuda_13_0(gpu_image):
    """An R580 driver (CUDA 13.0) rejects PTX from newer toolkits; the image also carries nvcc 13.5."""
    result = python_in(gpu_image, RUN_TIME_COMPILERS)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    # Triton assembles its PTX itself into a cubin (SASS), never handing PTX to the driver: torch 2.13
    # ships no ptxas, so Triton's own run: CUDA 12.8's for GPUs before Blackwell, 13.1's for Blackwell,
    # whose cubins an R580 driver loads (CUDA's minor version compatibility: only PTX needs a driver as
    # new as the toolkit that wrote it).
    assert facts["ptxas"] == {"torch": None, "triton": "12.8", "triton-blackwell": "13.1"}, facts["ptxas"]
    # FlashInfer's JIT would build SASS only (code=sm_...), never PTX the driver must JIT ...
    assert facts["flashinfer_gencode"]
    for flag in facts["flashinfer_gencode"]:
        assert re.fullmatch(r"-gencode=arch=compute_(\w+),code=sm_\1", flag), flag
    # ... and finds no nvcc: the 13.5 wheel's nvcc is on no path, and no CUDA_HOME is set.
    assert facts["nvcc_on_path"] is None and facts["cuda_home"] is None
    assert facts["torch_cuda"] == "13.0"
