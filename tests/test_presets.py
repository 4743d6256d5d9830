"""GaMS presets under the environment, and concurrency sized from the KV cache."""

from types import SimpleNamespace

import pytest

from gams_worker.serving.concurrency import KvCapacity, derive_concurrency, kv_capacity
from gams_worker.config import load_config
from gams_worker.startup.doctor import diagnose
from gams_worker.startup.host import GpuFacts, HostFacts
from gams_worker.errors import ConfigError
from gams_worker.presets import (
    GEMMA2_9B, GEMMA2_27B, GEMMA3_12B, PRESETS, choose_tensor_parallel, preset_for,
    preset_table,
)
from gams_worker.startup.plan import apply_preset


def test_presets_are_found_by_repo_id_in_any_case():
    assert preset_for("cjvt/GaMS-9B-Instruct").max_model_len == 8192
    assert preset_for("cjvt/GaMS2-27B-Instruct").architecture.layers == 46
    assert preset_for("CJVT/gams-27b-instruct/").weights_gib > 50
    assert preset_for("/models/my-own") is None


def test_preset_fills_only_what_the_environment_left_unset():
    config = load_config({"MODEL_NAME": "cjvt/GaMS-2B-Instruct", "GPU_MEMORY_UTILIZATION": "0.5"})
    resolved, sources = apply_preset(config, gpu_count=1, gpu_memory_gib=79.1)
    assert resolved.max_model_len == 8192 and sources["max_model_len"] == "preset"
    assert resolved.gpu_memory_utilization == 0.5 and sources["gpu_memory_utilization"] == "env"
    assert resolved.tensor_parallel_size == 1 and sources["tensor_parallel_size"] == "preset"


def test_environment_wins_over_the_preset_for_every_setting():
    env = {"MODEL_NAME": "cjvt/GaMS-27B-Instruct", "MAX_MODEL_LEN": "1024", "DTYPE": "float16",
           "GPU_MEMORY_UTILIZATION": "0.8", "TENSOR_PARALLEL_SIZE": "4"}
    resolved, sources = apply_preset(load_config(env), gpu_count=8, gpu_memory_gib=79.1)
    assert (resolved.max_model_len, resolved.dtype, resolved.gpu_memory_utilization,
            resolved.tensor_parallel_size) == (1024, "float16", 0.8, 4)
    assert set(sources.values()) == {"env"}


def test_other_models_keep_their_settings():
    config = load_config({"MODEL_NAME": "/models/tiny"})
    resolved, sources = apply_preset(config, gpu_count=2, gpu_memory_gib=79.1)
    assert resolved == config and set(sources.values()) == {"default"}


@pytest.mark.parametrize("weights, gpus, memory, expected", [
    (50.7, 2, 79.1, 1),   # GaMS-27B bf16 fits one 80 GB card at short context
    (50.7, 2, 44.4, 2),   # ... but needs two 48 GB cards
    (50.7, 1, 44.4, 1),   # only one card: never more than present (the doctor reports it)
    (17.2, 4, 22.0, 2),   # GaMS-9B on 24 GB cards: 17.2 GiB + headroom > 0.9 x 22
    (120.0, 8, 79.1, 2),
])
def test_tensor_parallel_is_the_fewest_gpus_that_hold_the_weights(weights, gpus, memory, expected):
    assert choose_tensor_parallel(weights, gpus, memory, 0.9) == expected


def test_concurrency_from_kv_capacity():
    # recorded on the H100 with GaMS-9B-shaped weights: "GPU KV cache size: 166,882 tokens"
    assert derive_concurrency(KvCapacity(166_882, 256), expected_tokens_per_job=1024) == 162
    assert derive_concurrency(KvCapacity(166_882, 128), expected_tokens_per_job=1024) == 128
    assert derive_concurrency(KvCapacity(12_064, 4), expected_tokens_per_job=64) == 4   # scheduler bound
    assert derive_concurrency(KvCapacity(500, 256), expected_tokens_per_job=1024) == 1  # never 0


def test_kv_capacity_reads_the_engine_config():
    cache = SimpleNamespace(kv_cache_size_tokens=None, num_gpu_blocks=100, block_size=16)
    engine = SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache,
                                                         scheduler_config=SimpleNamespace(max_num_seqs=256)))
    assert kv_capacity(engine) == KvCapacity(1600, 256)
    cache.kv_cache_size_tokens = 2048
    assert kv_capacity(engine) == KvCapacity(2048, 256)
    cache.kv_cache_size_tokens = cache.num_gpu_blocks = None  # an engine that reported no KV cache
    assert kv_capacity(engine) is None


def test_model_preset_applies_a_gams_preset_to_a_local_directory():
    config = load_config({"MODEL_NAME": "/models/gams", "MODEL_PRESET": "cjvt/GaMS-9B-Instruct"})
    resolved, sources = apply_preset(config, gpu_count=1, gpu_memory_gib=79.1)
    assert resolved.max_model_len == 8192 and sources["max_model_len"] == "preset"
    with pytest.raises(ConfigError) as info:  # read with the other settings: a bad value stops the worker at once
        load_config({"MODEL_PRESET": "cjvt/GaMS-1B"})
    assert info.value.variable == "MODEL_PRESET" and "cjvt/gams-9b-instruct" in info.value.allowed


def gpu(name, capability):
    return GpuFacts(name=name, compute_capability=capability, total_bytes=80 * 2**30, free_bytes=79 * 2**30)


def test_doctor_serves_fp8_weight_only_on_ampere_and_on_fp8_tensor_cores_from_ada():
    # Issue 31: vLLM runs FP8 weights on Ampere through its Marlin kernel (weight-only), so the doctor no
    # longer refuses QUANTIZATION=fp8 below 8.9; it says how FP8 runs on each architecture.
    a100 = HostFacts(platform="cuda", gpus=(gpu("NVIDIA A100-SXM4-80GB", "8.0"),))
    h100 = HostFacts(platform="cuda", gpus=(gpu("NVIDIA H100 80GB HBM3", "9.0"),))
    on_ampere = diagnose(a100, None, load_config({"QUANTIZATION": "fp8"}))
    assert not on_ampere.blocking and any("weight-only" in line for line in on_ampere.lines)
    assert not diagnose(h100, None, load_config({"QUANTIZATION": "fp8"})).blocking
    assert any("FP8 tensor cores" in line for line in diagnose(h100, None, load_config({})).lines)


def test_doctor_stops_tensor_parallel_beyond_the_gpus_present():
    one = HostFacts(platform="cuda", gpus=(gpu("NVIDIA H100 80GB HBM3", "9.0"),))
    report = diagnose(one, None, load_config({"TENSOR_PARALLEL_SIZE": "2"}))
    assert report.blocking == ("TENSOR_PARALLEL_SIZE=2 but 1 GPU(s) visible: deploy with 2 GPUs per worker "
                               "or lower TENSOR_PARALLEL_SIZE",)
    two = HostFacts(platform="cuda", gpus=(gpu("NVIDIA H100 80GB HBM3", "9.0"),) * 2)
    assert not diagnose(two, None, load_config({"TENSOR_PARALLEL_SIZE": "2"})).blocking


def test_kv_cache_per_sequence_counts_the_sliding_window_once():
    # Gemma 2 9B: 8 KV heads x 256 x 2 (K, V) x 2 bytes = 8 KiB per token and layer, 42 layers
    assert GEMMA2_9B.kv_gib_per_sequence(4096) == 42 * 4096 * 8 / 2**20  # 1.3125 GiB: the window covers all
    assert GEMMA2_9B.kv_gib_per_sequence(8192) == (21 * 8192 + 21 * 4096) * 8 / 2**20  # 1.97 GiB, not 2.63
    assert GEMMA2_27B.kv_gib_per_sequence(8192) == (23 * 8192 + 23 * 4096) * 8 / 2**20
    assert GEMMA3_12B.kv_gib_per_sequence(8192) == (8 * 8192 + 40 * 1024) * 8 / 2**20  # 0.81 GiB


def test_every_preset_states_its_architecture_and_the_table_lists_it():
    table = preset_table()
    for name, preset in PRESETS.items():
        assert preset.architecture is not None and preset.architecture.source
        assert f"`{name}`" in table
    assert "unknown positions" in table  # GaMS2-27B's context is not known here and the table says so


# --------------------------------------------------------------- max_num_seqs sized for the card
# Total memory as NVML reports it (MiB): H200 141 GB, H100 80GB HBM3, L40S 48 GB.
CARDS_MIB = {"H200": 143_771, "H100": 81_559, "L40S": 46_068}


def card(name: str, count: int = 1) -> HostFacts:
    gpu = GpuFacts(f"NVIDIA {name}", "9.0", CARDS_MIB[name] * 2**20, CARDS_MIB[name] * 2**20)
    return HostFacts(platform="cuda", gpus=(gpu,) * count)


def gams_9b_memory(config):
    from gams_worker.memory import memory_from_config
    from tests.test_doctor import GAMS_9B_CONFIG

    return memory_from_config(GAMS_9B_CONFIG, config.dtype, config.tensor_parallel_size)


@pytest.mark.parametrize("name, expected_tokens, low, high", [
    ("H200", 512, 512, 512),   # the default: the KV cache holds 650 such jobs: vLLM's largest CUDA graph caps it
    ("H100", 512, 320, 320),
    ("L40S", 512, 128, 128),   # 133
    ("H200", 1024, 320, 320),  # 0.33 GiB of KV per job: 107 GiB hold 328, a multiple of 16: 320
    ("H100", 1024, 160, 160),  # 161; the H100 measured 166,882 KV tokens: 162 such jobs
    ("L40S", 1024, 64, 64),    # 66: fewer than vLLM's default of 128
])
def test_max_num_seqs_is_what_the_kv_cache_holds_at_expected_tokens_per_job(name, expected_tokens, low, high, caplog):
    from gams_worker.startup.max_num_seqs import with_max_num_seqs

    config = load_config({"EXPECTED_TOKENS_PER_JOB": str(expected_tokens)})
    memory = gams_9b_memory(config)
    with caplog.at_level("INFO"):
        sized = with_max_num_seqs(config, card(name), memory)
    assert low <= sized.max_num_seqs <= high
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("max_num_seqs:")]
    assert line.startswith(f"max_num_seqs: {sized.max_num_seqs} = KV budget ")
    assert f"per {expected_tokens}-token job (EXPECTED_TOKENS_PER_JOB)" in line
    assert ("at most 512" in line) == (high == 512)
    assert ("rounded down to a multiple of 16" in line) == (high != 512)
    # The formula: (memory x utilization - weights - engine overhead) / KV per job.
    from gams_worker.memory import ENGINE_OVERHEAD_BYTES

    budget = CARDS_MIB[name] * 2**20 * 0.9 - memory.weight_bytes - ENGINE_OVERHEAD_BYTES
    fits = int(budget // memory.kv_bytes(expected_tokens))
    assert f"= {fits} jobs" in line
    assert sized.max_num_seqs == min(512, fits // 16 * 16)


def test_max_num_seqs_from_the_environment_wins_and_without_facts_vllm_decides(caplog):
    from gams_worker.startup.max_num_seqs import with_max_num_seqs

    config = load_config({"MAX_NUM_SEQS": "48"})
    with caplog.at_level("INFO"):
        assert with_max_num_seqs(config, card("H200"), gams_9b_memory(config)).max_num_seqs == 48
        default = load_config({})
        assert with_max_num_seqs(default, HostFacts(platform="cpu"), gams_9b_memory(default)).max_num_seqs is None
        assert with_max_num_seqs(default, card("H200"), None).max_num_seqs is None
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("max_num_seqs:")]
    assert lines[0].startswith("max_num_seqs: 48 (MAX_NUM_SEQS; sized, it would be 512 = KV budget ")
    assert lines[1:] == ["max_num_seqs: vLLM's default (no GPU memory to size it from)",
                         "max_num_seqs: vLLM's default (the model's memory is unknown: its config.json was not read)"]


def test_max_num_seqs_per_gpu_with_tensor_parallelism():
    from gams_worker.startup.max_num_seqs import with_max_num_seqs

    one = load_config({})
    two = load_config({"TENSOR_PARALLEL_SIZE": "2"})
    on_one = with_max_num_seqs(one, card("L40S"), gams_9b_memory(one)).max_num_seqs
    on_two = with_max_num_seqs(two, card("L40S", 2), gams_9b_memory(two)).max_num_seqs
    assert on_two > 2 * on_one  # weights split, KV split: each card keeps more room per sequence


def test_the_concurrency_line_says_which_bound_set_it():
    from gams_worker.serving.concurrency import concurrency_bound

    assert concurrency_bound(KvCapacity(166_882, 128), 1024) == "max_num_seqs set it (the KV cache holds 162 such jobs)"
    assert concurrency_bound(KvCapacity(166_882, 512), 1024) == "the KV cache set it"
