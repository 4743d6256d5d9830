"""The card plan for every RunPod card class and GaMS preset: memory model, capability rules, explicit
settings, refusals; pure, no engine."""

import dataclasses

import pytest

from gams_worker.config import load_config
from gams_worker.engine_info import EngineInfo
from gams_worker.errors import EngineStartError
from gams_worker.memory import GIB, free_utilization
from gams_worker.presets import GEMMA2_9B, PRESETS
from gams_worker.startup.card_plan import MIN_SEQUENCES, Card, apply_card_plan, plan_card
from gams_worker.startup.card_table import CARD_CLASSES, card_table, plan_for, preset_groups, with_card_table
from gams_worker.startup.doctor import diagnose
from gams_worker.startup.host import GpuFacts, HostFacts
from gams_worker.startup.plan import apply_preset
from tests.harness.worker_process import ROOT

GAMS_9B = "cjvt/gams-9b-instruct"
CLASS = {cls.pools[0]: cls.card for cls in CARD_CLASSES}


def host(name="NVIDIA H100 80GB HBM3", capability="9.0", total_gib=79.65, free_gib=79.1, count=1):
    gpu = GpuFacts(name, capability, int(total_gib * GIB), int(free_gib * GIB))
    return HostFacts(platform="cuda", gpus=(gpu,) * count)


def planned(env, facts):
    config, _ = apply_preset(load_config(env), len(facts.gpus), facts.gpus[0].total_gib)
    return apply_card_plan(config, facts)


@pytest.mark.parametrize("cls", CARD_CLASSES, ids=lambda cls: cls.pools[0])
@pytest.mark.parametrize("name", list(preset_groups()))
def test_every_plan_holds_its_sequences_by_the_memory_model(cls, name):
    plan = plan_for(name, cls.card)
    if plan is None:
        return
    memory = PRESETS[name].architecture.memory(int(PRESETS[name].weights_gib * GIB), plan.tensor_parallel_size,
                                               quantization=plan.quantization, kv_cache_dtype=plan.kv_cache_dtype)
    assert plan.sequences == memory.sequences_that_fit(cls.card.total_bytes, plan.gpu_memory_utilization,
                                                        plan.max_model_len) >= MIN_SEQUENCES
    assert plan.max_model_len <= PRESETS[name].max_model_len
    assert cls.card.total_bytes * plan.gpu_memory_utilization <= cls.card.free_bytes  # vLLM's own check


@pytest.mark.parametrize("pool, expected", [
    ("AMPERE_16", ("fp8", "fp8", 6144)),   # FP8 weights and KV cache, and a shorter context still
    ("AMPERE_24", ("fp8", "fp8", 8192)),   # A4500's 20 GB: FP8 weights leave room for 3 bf16-cache sequences
    ("ADA_24", ("fp8", "auto", 8192)),     # L4: bf16 leaves ~1 GiB of KV cache, FP8 weights ~10 GiB
    ("ADA_32_PRO", (None, "auto", 8192)),  # the seed's 32 GB card: bf16 fits
    ("AMPERE_48", (None, "auto", 8192)),
    ("HOPPER_141", (None, "auto", 8192)),
])
def test_gams_9b_goes_down_the_ladder_only_as_far_as_the_card_needs(pool, expected):
    plan = plan_for(GAMS_9B, CLASS[pool])
    assert (plan.quantization, plan.kv_cache_dtype, plan.max_model_len) == expected


def test_fp8_weights_count_their_own_bytes_and_keep_the_embedding():
    bf16 = GEMMA2_9B.memory(int(17.2 * GIB))
    fp8 = GEMMA2_9B.memory(int(17.2 * GIB), quantization="fp8", kv_cache_dtype="fp8")
    embedding = GEMMA2_9B.embedding_params * 2
    assert fp8.weight_bytes == (bf16.weight_bytes - embedding) // 2 + embedding  # ~9.45 GiB; vLLM: 9.74
    assert fp8.kv_bytes(8192) * 2 == bf16.kv_bytes(8192)


def test_a_card_partly_in_use_plans_for_what_is_free():
    # The H100 with 57 GiB held by another process: 21.66 GiB free, as a 24 GB card.
    config, line = planned({}, host(free_gib=21.66))
    assert config.gpu_memory_utilization == free_utilization(int(79.65 * GIB), int(21.66 * GIB)) == 0.26
    assert config.quantization == "fp8" and config.max_model_len == 8192
    assert line.startswith("plan: FP8 weights, bf16 KV cache, 8192 tokens, GPU_MEMORY_UTILIZATION 0.26: ")
    assert line.endswith("fewer than 4 sequences with bf16 weights, bf16 KV cache, 8192 tokens: 1")
    other, line = planned({"MODEL_NAME": "/models/tiny"}, host(free_gib=21.66))  # any model: the free memory
    assert other.gpu_memory_utilization == 0.26 and other.quantization is None and "21.7 of 79.6 GiB free" in line


def test_explicit_settings_win():
    env = {"QUANTIZATION": "fp8", "MAX_MODEL_LEN": "4096", "GPU_MEMORY_UTILIZATION": "0.5"}
    config, line = planned(env, host())
    assert (config.quantization, config.max_model_len, config.gpu_memory_utilization) == ("fp8", 4096, 0.5)
    kv, _ = planned({"ENGINE_ARGS": '{"kv_cache_dtype": "fp8_e4m3"}'}, host())
    assert kv.kv_cache_dtype == "fp8_e4m3" and kv.quantization is None
    fewer, line = planned({"MAX_MODEL_LEN": "8192"}, host("NVIDIA RTX A4000", "8.6", 15.99, 15.5))
    assert fewer.max_model_len == 8192 and "MAX_MODEL_LEN is set" in line  # 3 sequences: served as asked
    tp, _ = planned({"TENSOR_PARALLEL_SIZE": "2", "MODEL_NAME": "cjvt/GaMS-27B-Instruct"}, host(count=2))
    assert tp.tensor_parallel_size == 2 and tp.quantization is None


def test_two_cards_split_bf16_before_fp8_on_one():
    config, line = planned({"MODEL_NAME": "cjvt/GaMS-27B-Instruct"}, host("NVIDIA L40S", "8.9", 44.99, 44.4, 2))
    assert (config.tensor_parallel_size, config.quantization) == (2, None) and "TP 2" in line


def test_a_model_the_card_cannot_serve_is_refused_naming_what_would():
    with pytest.raises(EngineStartError) as info:
        planned({"MODEL_NAME": "cjvt/GaMS-27B-Instruct"}, host("NVIDIA L4", "8.9", 22.49, 22.0))
    assert "does not fit 1 x NVIDIA L4" in str(info.value) and "about 33 GiB free" in str(info.value)
    assert "TENSOR_PARALLEL_SIZE=2" in str(info.value)
    with pytest.raises(EngineStartError) as info:  # as set it cannot: unset, the worker would serve
        planned({"MAX_MODEL_LEN": "8192", "QUANTIZATION": "fp8", "GPU_MEMORY_UTILIZATION": "0.5"},
                host("NVIDIA L4", "8.9", 22.49, 22.0))
    assert "as set: unset QUANTIZATION, MAX_MODEL_LEN, GPU_MEMORY_UTILIZATION and the worker serves FP8 weights, " \
           "bf16 KV cache, 8192 tokens" in str(info.value)


def test_no_card_no_plan():
    config = load_config({})
    assert apply_card_plan(config, HostFacts(platform="cpu")) == (config, "")
    unknown = HostFacts(platform="cuda", gpus=(GpuFacts("NVIDIA H100", "9.0", None, None),))
    assert apply_card_plan(config, unknown) == (config, "")


def test_the_doctor_knows_each_architecture():
    lines = lambda capability: "\n".join(diagnose(host(capability=capability), None, load_config({})).lines)
    assert "weight-only" in lines("8.6") and "Triton attention" in lines("8.6")
    assert "FP8 tensor cores" in lines("8.9") and "Triton attention" not in lines("9.0")
    assert "FlashAttention 2" in lines("10.0") and "FlashAttention 2" in lines("12.0")
    assert "Blackwell" not in lines("9.0")


def test_cards_older_than_the_image_build_are_refused_by_name():
    v100 = dataclasses.replace(host("Tesla V100-SXM2-32GB", "7.0", 31.7, 31.2), cuda_arches=(75, 80, 86, 90, 100, 120))
    [problem] = diagnose(v100, None, load_config({})).blocking
    assert problem.startswith("Tesla V100-SXM2-32GB (compute capability 7.0) is not supported by this image")
    assert "7.5 and newer" in problem
    h100 = dataclasses.replace(host(), cuda_arches=(75, 80, 86, 90, 100, 120))
    assert not diagnose(h100, None, load_config({})).blocking


def test_explicit_utilization_above_the_free_memory_is_refused_before_vllm_refuses_it():
    report = diagnose(host(free_gib=21.66), None, load_config({"GPU_MEMORY_UTILIZATION": "0.9"}))
    assert len(report.blocking) == 1 and "lower GPU_MEMORY_UTILIZATION to 0.26" in report.blocking[0]


def test_the_first_jobs_metadata_carries_the_plan():
    info = EngineInfo("full", "default", "cuda", 12.5, plan="plan: bf16 weights, ...")
    assert info.to_output()["plan"] == "plan: bf16 weights, ..."


def test_readme_card_table_is_current():
    document = (ROOT / "README.md").read_text(encoding="utf-8")
    assert with_card_table(document) == document, "stale: python -m gams_worker.startup.card_table --markdown"
    assert card_table().count("\n") == len(CARD_CLASSES) + 1


def test_the_sizing_counts_the_chosen_weights_and_kv_cache():
    # Issue 31: with QUANTIZATION=fp8 the sizing still counted bf16 weights ("- 17.2 GiB weights" -> 12 jobs).
    from gams_worker.memory import memory_from_config
    from gams_worker.startup.max_num_seqs import size_max_num_seqs
    from tests.test_doctor import GAMS_9B_CONFIG

    total = int(79.65 * GIB)
    bf16 = memory_from_config(GAMS_9B_CONFIG, "bfloat16", 1)
    fp8 = memory_from_config(GAMS_9B_CONFIG, "bfloat16", 1, quantization="fp8")
    both = memory_from_config(GAMS_9B_CONFIG, "bfloat16", 1, quantization="fp8", kv_cache_dtype="fp8")
    sized = [size_max_num_seqs(memory, total, 0.26, 512)[0] for memory in (bf16, fp8, both)]
    assert sized[0] < sized[1] < sized[2] and sized[1] >= 48
    assert "- 9.5 GiB weights -" in size_max_num_seqs(fp8, total, 0.26, 512)[1]


def test_plan_engine_refuses_before_the_engine_in_one_line(monkeypatch):
    from gams_worker.startup import plan

    monkeypatch.setattr(plan, "host_facts", lambda: host("NVIDIA L4", "8.9", 22.49, 22.0))
    with pytest.raises(EngineStartError) as info:
        plan.plan_engine(load_config({"MODEL_NAME": "cjvt/GaMS-27B-Instruct"}), None)
    assert "\n" not in str(info.value) and "does not fit 1 x NVIDIA L4" in str(info.value)


def test_a_card_older_than_the_build_gets_no_plan_and_the_doctors_refusal():
    v100 = dataclasses.replace(host("Tesla V100-SXM2-16GB", "7.0", 15.77, 15.3), cuda_arches=(75, 80, 90))
    config = load_config({})
    assert apply_card_plan(config, v100) == (config, "")


def test_the_torch_cuda_arches_are_those_of_the_locks_torch():
    """startup/host.py names the CUDA arches of the lock's torch build instead of asking torch, whose
    answer initializes CUDA and breaks vLLM's forked engine process (seen on the H100): update both together."""
    from pathlib import Path

    from gams_worker.startup.host import TORCH_CUDA_ARCHES

    root = Path(__file__).resolve().parent.parent
    assert "torch==2.13.0\n" in (root / "requirements.lock").read_text()  # PyPI's build: CUDA 13.0
    assert TORCH_CUDA_ARCHES == (75, 80, 86, 90, 100, 120)
