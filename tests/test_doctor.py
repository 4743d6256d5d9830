"""Unit tests of the CUDA doctor: verdicts for described hosts, and probes that never crash."""

from __future__ import annotations

import logging

from gams_worker.config import WorkerConfig
from gams_worker.startup import host
from gams_worker.memory import ENGINE_OVERHEAD_BYTES, GIB, memory_from_config
from gams_worker.presets import GEMMA2_9B
from gams_worker.startup.doctor import diagnose, run_doctor
from gams_worker.startup.host import GpuFacts, HostFacts

# GaMS-9B-Instruct's config.json (a Gemma 2 9B), the fields the estimate reads.
GAMS_9B_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "vocab_size": 256000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "sliding_window": 4096,
}
GEMMA2_9B_PARAMETERS = 9_241_705_984  # as published for google/gemma-2-9b


def h100(free_gib: float = 79.0, driver_cuda: str = "13.0") -> HostFacts:
    return HostFacts(
        platform="cuda",
        gpus=(GpuFacts("NVIDIA H100 80GB HBM3", "9.0", int(79.6 * GIB), int(free_gib * GIB)),),
        driver_version="580.82.07", driver_cuda=driver_cuda,
        torch_version="2.11.0+cu130", torch_cuda="13.0", vllm_version="0.25.0",
    )


def gams_memory(config: WorkerConfig):
    return memory_from_config(GAMS_9B_CONFIG, config.dtype, config.tensor_parallel_size)


def test_weight_estimate_matches_the_published_parameter_count():
    memory = gams_memory(WorkerConfig())
    assert abs(memory.weight_bytes / 2 - GEMMA2_9B_PARAMETERS) / GEMMA2_9B_PARAMETERS < 0.01
    # K and V, 8 KV heads of 256, bf16; 21 of the 42 layers keep only a 4096-token window
    assert memory.kv_bytes_per_layer_token == 2 * 8 * 256 * 2
    assert (memory.full_layers, memory.sliding_layers, memory.sliding_window) == (21, 21, 4096)
    assert memory.kv_bytes(4096) == 42 * 4096 * memory.kv_bytes_per_layer_token
    assert memory.kv_bytes(8192) == (21 * 8192 + 21 * 4096) * memory.kv_bytes_per_layer_token
    assert memory.kv_bytes(8192) == round(GEMMA2_9B.kv_gib_per_sequence(8192) * GIB)  # the presets agree
    halves = memory_from_config(GAMS_9B_CONFIG, "bfloat16", tensor_parallel_size=2)
    assert halves.weight_bytes == memory.weight_bytes // 2


def test_healthy_h100_has_no_verdicts_and_starts_in_the_default_rung():
    config = WorkerConfig()
    report = diagnose(h100(), gams_memory(config), config)
    assert report.verdicts == ()
    assert report.start_mode is None
    text = "\n".join(report.lines)
    assert "NVIDIA H100 80GB HBM3, compute capability 9.0" in text
    assert "driver 580.82.07, supports CUDA up to 13.0" in text
    assert "torch 2.11.0+cu130 built for CUDA 13.0; vLLM 0.25.0" in text


def test_driver_older_than_the_toolkit_names_the_remedy_and_starts_at_piecewise():
    config = WorkerConfig()
    report = diagnose(h100(driver_cuda="12.4"), gams_memory(config), config)
    assert ("driver supports CUDA 12.4, this image needs 13.0: deploy on hosts with CUDA >= 13.0 "
            "(RunPod: allowedCudaVersions) or use the CUDA-12 image") in report.verdicts
    assert report.start_mode == "piecewise"
    assert "starts at piecewise" in report.start_reason
    assert any("starting at piecewise" in verdict for verdict in report.verdicts)


def test_old_driver_keeps_the_default_rung_when_the_user_chose_it():
    for config in (WorkerConfig(graph_fallback=False), WorkerConfig(enforce_eager=True)):
        report = diagnose(h100(driver_cuda="12.4"), gams_memory(config), config)
        assert report.start_mode is None
        assert any("driver supports CUDA 12.4" in verdict for verdict in report.verdicts)


def test_too_long_context_for_the_gpu_suggests_a_max_model_len_that_fits():
    config = WorkerConfig(max_model_len=32768, gpu_memory_utilization=0.9)
    small_gpu = HostFacts(platform="cuda", gpus=(GpuFacts("NVIDIA L4", "8.9", 24 * GIB, 23 * GIB),),
                          driver_cuda="13.0", torch_cuda="13.0")
    memory = gams_memory(config)
    [verdict] = diagnose(small_gpu, memory, config).verdicts
    assert "at MAX_MODEL_LEN=32768" in verdict and "TENSOR_PARALLEL_SIZE=2" in verdict
    suggested = int(verdict.split("lower MAX_MODEL_LEN to ")[1].split(" ")[0])
    budget = 24 * GIB * 0.9
    fixed = memory.weight_bytes + ENGINE_OVERHEAD_BYTES
    assert suggested > GEMMA2_9B.sliding_window  # past the window only the full layers grow
    assert fixed + memory.kv_bytes(suggested) <= budget
    assert fixed + memory.kv_bytes(suggested + 256) > budget


def test_kv_estimate_counts_sliding_layers_only_where_config_json_says_which_slide():
    plain = {key: value for key, value in GAMS_9B_CONFIG.items() if key not in ("model_type", "architectures")}
    unknown = memory_from_config(plain, "bfloat16", 1)  # a window, but no word of which layers use it
    assert (unknown.full_layers, unknown.sliding_layers) == (42, 0)
    unused = memory_from_config({**plain, "use_sliding_window": False, "sliding_window_pattern": 2}, "bfloat16", 1)
    assert unused.sliding_layers == 0  # Qwen2 names a window it does not use
    typed = memory_from_config({**plain, "layer_types": ["sliding_attention"] * 35 + ["full_attention"] * 7},
                               "bfloat16", 1)
    assert (typed.full_layers, typed.sliding_layers) == (7, 35)
    gemma3 = memory_from_config({**plain, "sliding_window_pattern": 6}, "bfloat16", 1)
    assert (gemma3.full_layers, gemma3.sliding_layers) == (7, 35)
    assert typed.longest_sequence(typed.kv_bytes(100_000)) == 100_000
    assert typed.longest_sequence(typed.kv_bytes(1000)) == 1000


def test_weights_that_cannot_fit_ask_for_quantization_or_tensor_parallelism():
    config = WorkerConfig()
    tiny_gpu = HostFacts(platform="cuda", gpus=(GpuFacts("Tesla T4", "7.5", 15 * GIB, 15 * GIB),))
    [verdict] = diagnose(tiny_gpu, gams_memory(config), config).verdicts
    assert "the weights alone do not fit: quantize or TENSOR_PARALLEL_SIZE=2" in verdict


def test_busy_gpu_suggests_a_lower_memory_utilization():
    config = WorkerConfig(gpu_memory_utilization=0.9)
    report = diagnose(h100(free_gib=40.0), gams_memory(config), config)
    [verdict] = report.verdicts
    assert "only 40.00 GiB of 79.60 GiB free" in verdict
    # Issue 31: vLLM refuses total x utilization above free memory, and its engine process makes its own
    # CUDA context after the worker looked: 0.50 x 79.6 GiB would be refused. It blocks the start.
    assert "GPU_MEMORY_UTILIZATION to 0.49" in verdict and report.blocking == (verdict,)


def test_cpu_host_reports_the_cpu_backend_without_verdicts():
    config = WorkerConfig()
    report = diagnose(HostFacts(platform="cpu", torch_version="2.13.0+cpu"), None, config)
    assert report.verdicts == () and report.start_mode is None
    assert any("CPU backend" in line for line in report.lines)


def test_run_doctor_on_this_machine_reports_and_continues(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO)
    report = run_doctor(WorkerConfig(model_name=tiny_model_dir), host.host_facts(), tiny_model_dir)
    assert report.facts.platform == "cpu"
    import torch

    assert report.facts.torch_version == torch.__version__
    assert "doctor report:" in caplog.text and "CPU backend" in caplog.text
    assert any("model needs ~" in line for line in report.lines)


def test_probes_without_nvml_report_unknown_instead_of_crashing(monkeypatch):
    # This machine has no libnvidia-ml and a CPU build of vLLM: the GPU probes must fall back quietly.
    monkeypatch.setattr(host, "platform_name", lambda: "cuda")
    facts = host.collect_host_facts()
    assert facts.platform == "cuda"
    assert facts.gpus == () and facts.driver_cuda == host.UNKNOWN
    report = diagnose(facts, None, WorkerConfig())
    assert any("no GPU visible" in verdict for verdict in report.verdicts)


def test_doctor_survives_a_probe_that_raises(monkeypatch):
    def broken():
        raise OSError("no such device")

    monkeypatch.setattr(host, "collect_host_facts", broken)
    report = run_doctor(WorkerConfig(model_name="/nonexistent"), host.host_facts(), "/nonexistent")
    assert report.facts.platform == host.UNKNOWN
    assert any("model memory: unknown" in line for line in report.lines)


def test_no_gpu_and_no_cpu_build_is_a_blocking_plain_verdict():
    """The GPU image on a host without a GPU: vLLM's platform is unspecified ("none")."""
    facts = HostFacts(platform="none", torch_version="2.11.0+cu130", torch_cuda="13.0", vllm_version="0.25.1")
    report = diagnose(facts, None, WorkerConfig())
    assert report.blocking and report.blocking[0].startswith("no NVIDIA GPU is visible")
    assert report.verdicts == report.blocking


def test_a_driver_older_than_runpod_min_cuda_version_blocks_the_start():
    config = WorkerConfig(min_cuda_version="13.0")
    report = diagnose(h100(driver_cuda="12.8"), gams_memory(config), config)
    assert report.blocking == ("driver supports CUDA 12.8, RUNPOD_MIN_CUDA_VERSION is 13.0: deploy on hosts with "
                               "CUDA >= 13.0 (RunPod: allowedCudaVersions)",)
    for driver_cuda in ("13.0", "13.2"):
        assert diagnose(h100(driver_cuda=driver_cuda), gams_memory(config), config).blocking == ()
    # Without the setting, an old driver only moves the start to piecewise (the fallback ladder).
    unset = diagnose(h100(driver_cuda="12.8"), gams_memory(WorkerConfig()), WorkerConfig())
    assert unset.blocking == () and unset.start_mode == "piecewise"


def test_gpu_facts_come_from_vllms_platform_and_nvml(monkeypatch):
    """What host.py asks of vLLM's CUDA platform and NVML, on a stand-in for both (this machine has no GPU)."""
    import contextlib
    from types import SimpleNamespace

    import vllm.platforms

    class CudaPlatform:
        def is_cuda(self):
            return True

        def device_count(self):
            return 2

        def get_device_capability(self, index):
            return SimpleNamespace(major=9, minor=0)

        def get_device_name(self, index):
            return "NVIDIA H100 80GB HBM3"

        def device_id_to_physical_device_id(self, index):
            return (3, 5)[index]  # CUDA_VISIBLE_DEVICES=3,5

    nvml = SimpleNamespace(
        nvmlDeviceGetHandleByIndex=lambda physical: physical,
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(total=80 * GIB, free=(70 + handle) * GIB),
        nvmlSystemGetCudaDriverVersion_v2=lambda: 13000,
        nvmlSystemGetDriverVersion=lambda: "580.82.07")
    monkeypatch.setattr(vllm.platforms, "current_platform", CudaPlatform())
    monkeypatch.setattr(host, "_nvml", lambda: contextlib.nullcontext(nvml))
    facts = host.collect_host_facts()
    assert facts.gpus == (GpuFacts("NVIDIA H100 80GB HBM3", "9.0", 80 * GIB, 73 * GIB),
                          GpuFacts("NVIDIA H100 80GB HBM3", "9.0", 80 * GIB, 75 * GIB))
    assert (facts.platform, facts.driver_version, facts.driver_cuda) == ("cuda", "580.82.07", "13.0")
