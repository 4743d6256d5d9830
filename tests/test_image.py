"""The image's build files agree with each other and with the pinned wheels; linters are clean.

What the CUDA checks really check:
- test_base_image_cuda_is_the_one_the_pinned_vllm_was_built_for reads the vLLM pin from
  requirements.txt and looks it up in VLLM_BUILD_CUDA below (a table of facts read from PyPI
  metadata: vllm -> torch pin -> torch's cuda-toolkit pin); the Dockerfile's base tag, its
  declared ``# VLLM_CUDA=`` and docker-bake.hcl must all agree with it. A vLLM bump without
  a table entry fails, so nobody bumps one side alone.
- test_requirements_resolve_for_the_image asks pip's resolver (PyPI metadata, no install)
  for requirements.txt on the image's Python and platform, and checks the CUDA toolkit that
  the resolved torch requires is the Dockerfile's: the table above verified against PyPI.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gams_worker.config import WorkerConfig
from tests.harness.worker_process import ROOT

# vLLM release on PyPI -> CUDA major.minor of its Linux x86_64 build, from the wheels' metadata:
# vllm 0.32.0 requires torch==2.13.0; torch 2.13.0 requires cuda-toolkit[...]==13.0.3.
VLLM_BUILD_CUDA = {"0.32.0": "13.0"}
VENV_BIN = Path(sys.executable).parent


def pinned(requirements: Path, package: str) -> str:
    match = re.search(rf"^{package}==([^\s#;]+)", requirements.read_text(), re.MULTILINE)
    assert match, f"{requirements.name} must pin {package}=="
    return match.group(1)


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def image_cuda() -> str:
    """The full CUDA version of the Dockerfile's base image, e.g. 13.0.2."""
    text = dockerfile()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\$\{CUDA_VERSION\}-base-ubuntu24\.04$", text, re.MULTILINE)
    return re.search(r"^ARG CUDA_VERSION=(\d+\.\d+\.\d+)$", text, re.MULTILINE).group(1)


def major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def bake_variable(name: str) -> str:
    return re.search(rf'^variable "{name}" {{ default = "([^"]*)" }}', (ROOT / "docker-bake.hcl").read_text(),
                     re.MULTILINE).group(1)


def image_python() -> str:
    return re.search(r"^ARG PYTHON=python(3\.\d+)$", dockerfile(), re.MULTILINE).group(1)


def test_base_image_cuda_is_the_one_the_pinned_vllm_was_built_for():
    vllm = pinned(ROOT / "requirements.txt", "vllm")
    assert vllm in VLLM_BUILD_CUDA, f"vllm {vllm}: read its CUDA build from PyPI and add it to VLLM_BUILD_CUDA"
    cuda = VLLM_BUILD_CUDA[vllm]
    assert major_minor(image_cuda()) == cuda
    assert re.search(rf"^# VLLM_CUDA={re.escape(cuda)}$", dockerfile(), re.MULTILINE)
    assert bake_variable("VLLM_VERSION") == vllm
    assert bake_variable("CUDA_VERSION") == image_cuda()
    assert bake_variable("CUDA_TAG") == cuda


def test_bake_stage_uses_the_same_hub_client_as_the_image():
    """The bake stage pins huggingface_hub; the CPU venv (where the bake is tested) must match it."""
    import huggingface_hub

    pin = re.search(r"pip install huggingface_hub==(\S+)", dockerfile()).group(1)
    assert pin == huggingface_hub.__version__


def test_token_is_a_build_secret_not_an_arg_or_env():
    text = dockerfile()
    assert "--mount=type=secret,id=hf_token" in text
    assert not re.search(r"^(ARG|ENV)\s+[^\n]*(HF_TOKEN|HUGGING_FACE_HUB_TOKEN)", text, re.MULTILINE)
    assert 'secret = ["id=hf_token,env=HF_TOKEN"]' in (ROOT / "docker-bake.hcl").read_text()


def test_layers_weights_then_packages_then_code():
    """Weights first (a pin change must not rebuild or re-push 18.5 GB), then the lock, then the code."""
    text = dockerfile()
    worker = text[text.index("AS worker"):]
    weights = worker.index("COPY --from=bake /models /models")
    packages = worker.index("pip install --no-deps --find-links /wheels -r /tmp/requirements.lock")
    assert weights < packages < worker.index("COPY gams_worker/") and packages < worker.index("COPY handler.py")
    assert re.search(r"^ARG LOCK=requirements.lock$", worker, re.MULTILINE)
    assert re.search(r'^CMD \["python", "handler.py"\]$', text, re.MULTILINE)


def test_pip_downloads_are_cached_and_the_ca_bundle_is_only_a_secret():
    text = dockerfile()
    steps = [line for line in text.replace("\\\n", " ").splitlines() if line.startswith("RUN ")]
    pip_steps = [step for step in steps if "pip install" in step]
    assert len(pip_steps) == 2, steps  # the bake stage's hub client, the worker's lock
    for step in pip_steps:
        assert "--mount=type=cache,id=gams-pip,target=/root/.cache/pip" in step, step
        assert "--mount=type=secret,id=cacert,required=false" in step, step
    assert "PIP_NO_CACHE_DIR" not in text
    assert not re.search(r"^(COPY|ADD|ENV|ARG)[^\n]*(cacert|ca-certificates\.crt|PIP_CERT)", text, re.MULTILINE)
    assert "hf_transfer" not in text.lower() and "HF_HUB_ENABLE_HF_TRANSFER" not in text


def test_base_image_and_python_are_build_args():
    text = dockerfile()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\$\{CUDA_VERSION\}-base-ubuntu24\.04$", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", text, re.MULTILINE)
    assert re.search(r"^ARG PYTHON=python3\.12$", text, re.MULTILINE)


def runpod_files():
    return [json.loads((ROOT / ".runpod" / name).read_text()) for name in ("hub.json", "tests.json")]


def test_runpod_hub_files_match_the_image_and_the_config():
    hub, tests = runpod_files()
    cuda = tuple(int(p) for p in major_minor(image_cuda()).split("."))
    # RunPod matches hosts by the CUDA version their driver reports: list the image's CUDA and
    # every newer minor, or hosts with newer drivers are left out.
    allowed = hub["config"]["allowedCudaVersions"]
    assert tests["config"]["allowedCudaVersions"] == allowed
    assert allowed == [f"{cuda[0]}.{minor}" for minor in range(cuda[1], cuda[1] + len(allowed))]
    assert len(allowed) >= 2
    # The SDK's own start check refuses the same hosts (Dockerfile ENV).
    assert re.search(rf"RUNPOD_MIN_CUDA_VERSION={cuda[0]}\.{cuda[1]} ", dockerfile())

    config_source = (ROOT / "gams_worker" / "config.py").read_text()
    defaults = WorkerConfig()
    for item in hub["config"]["env"]:
        key = item["key"]
        assert key == "HF_TOKEN" or f'"{key}"' in config_source, f"{key} is not a setting of the worker"
        field = key.lower()
        if "default" in item["input"] and hasattr(defaults, field):
            assert item["input"]["default"] == getattr(defaults, field), key
    preset = hub["config"]["presets"][0]["defaults"]
    assert preset["MODEL_NAME"] == defaults.model_name
    assert preset["MAX_MODEL_LEN"] >= 4096


def test_runpod_lists_every_gpu_class_the_card_plan_serves_the_default_model_on():
    # Issue 31: the worker plans for the card (FP8 weights, FP8 KV cache, shorter context): from 16 GB up.
    from gams_worker.startup.card_table import served_pools

    hub, tests = runpod_files()
    assert sorted(hub["config"]["gpuIds"].split(",")) == sorted(served_pools(WorkerConfig().model_name.lower()))
    assert tests["config"]["gpuTypeId"] in ("NVIDIA L40S", "NVIDIA RTX A6000", "NVIDIA A40",
                                            "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3")


def run_linter(name: str, *args: str) -> subprocess.CompletedProcess:
    tool = VENV_BIN / name
    assert tool.exists(), f"{name} is missing from the venv: it is in requirements-cpu.txt (scripts/setup.sh)"
    return subprocess.run([str(tool), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_hadolint_is_clean():
    result = run_linter("hadolint", "--no-color", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_is_clean():
    workflows = sorted(str(p.relative_to(ROOT)) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    assert {Path(w).name for w in workflows} >= {"tests.yml", "image.yml"}
    result = run_linter("actionlint", "-no-color", *workflows)
    assert result.returncode == 0, result.stdout + result.stderr


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    """pip's resolution of requirements.txt for the image's Python on manylinux x86_64 (dry run)."""
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable: cannot resolve requirements.txt")
    tmp = tmp_path_factory.mktemp("resolve")
    # pip expands no manylinux_2_x tag by itself: list the ones Ubuntu 24.04 (glibc 2.39) runs.
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--target", str(tmp / "target"), "--only-binary=:all:",
               "--python-version", image_python(), "--implementation", "cp",
               "--abi", "cp" + image_python().replace(".", ""),
               *[arg for p in platforms for arg in ("--platform", p)],
               "--report", str(tmp / "report.json"), "-r", str(ROOT / "requirements.txt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp / "report.json").read_text())
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"] for item in report["install"]}


def test_requirements_resolve_for_the_image(resolved):
    from packaging.requirements import Requirement
    from packaging.version import Version

    assert resolved["vllm"]["version"] == pinned(ROOT / "requirements.txt", "vllm")
    torch_pin = next(Requirement(r) for r in resolved["vllm"]["requires_dist"] if Requirement(r).name == "torch")
    assert resolved["torch"]["version"] in torch_pin.specifier
    toolkit = next(Requirement(r) for r in resolved["torch"]["requires_dist"]
                   if Requirement(r).name == "cuda-toolkit" and "Linux" in str(r))
    toolkit_version = str(next(iter(toolkit.specifier)).version)
    assert major_minor(toolkit_version) == major_minor(image_cuda()), (toolkit, image_cuda())
    assert Version(resolved["fastapi"]["version"]) < Version("0.137")


def test_pinned_runpod_has_per_job_stop_and_runs_on_the_resolved_set(resolved, tmp_path):
    """runpod is installed with --no-deps: its needs, but fastapi, must be met by vLLM's set."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    version = pinned(ROOT / "requirements-runpod.txt", "runpod")
    download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--quiet", "-d", str(tmp_path), f"runpod=={version}"],
                              capture_output=True, text=True, timeout=120)
    assert download.returncode == 0, download.stderr[-2000:]
    wheel = zipfile.ZipFile(next(tmp_path.glob("runpod-*.whl")))
    scaler = wheel.read("runpod/serverless/modules/rp_scale.py").decode()
    assert "async def monitor_stop_signals" in scaler  # stops one signalled job, not the worker
    metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    unmet = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        requirement = Requirement(line[len("Requires-Dist: "):])
        if requirement.marker and not requirement.marker.evaluate({"extra": "", "python_version": image_python()}):
            continue
        have = resolved.get(requirement.name.lower().replace("_", "-"))
        if have is None or Version(have["version"]) not in requirement.specifier:
            unmet.append(requirement.name)
    # The one known clash: runpod declares a newer fastapi than vLLM allows; runpod's worker
    # loop does not use fastapi (only its local test API server does).
    assert unmet == ["fastapi"], unmet
