"""LoRA adapters (LORA_MODULES): the settings, the start checks and the memory they take, without an engine;
then one `python handler.py` on the real runpod SDK job loop (tests/harness/runpod_emulator.py) serving the
tiny model and two PEFT-format adapters with seeded random weights (builder/lora_adapter.py), and one on PORT,
compared with vLLM's own LLM.generate in a process of its own (tests/harness/lora_reference.py), all started
at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests

from builder import lora_adapter
from gams_worker.config import load_config
from gams_worker.errors import AdapterError, ConfigError, JobInputError
from gams_worker.jobs.adapters import Adapters
from gams_worker.memory import GIB
from gams_worker.presets import GEMMA2_9B
from gams_worker.startup.adapters import locate_adapters
from gams_worker.startup.engine import engine_kwargs
from tests.harness.openai_proxy import OpenAIProxy
from tests.harness.runpod_emulator import RunPodEmulator
from tests.harness.worker_process import (
    ROOT, START_TIMEOUT_S, WorkerProcess, engine_env, free_port, start_platform_worker, subprocess_env,
    wait_for_first_take, wait_until,
)

PROMPT = "Ljubljana je mesto, kjer"
TOKENS = 24


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two rank-8 adapters of the tiny model, seeds 1 and 2."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(lora_adapter.build(tiny_model_dir, str(root / name), rank=8, seed=seed, scale=0.5))
            for name, seed in (("sl", 1), ("legal", 2))}


def config_with(model_dir: str, **env: str):
    return load_config(engine_env(model_dir, **env))


# --- settings, engine arguments, memory --------------------------------------------------------


def test_lora_modules_take_vllm_serve_formats():
    config = load_config({"LORA_MODULES": 'a=/x b=org/repo {"name": "c", "path": "/y", "base_model_name": "m"} '
                                          '[{"name": "d", "path": "/z"}]'})
    assert config.lora_modules == ("a=/x", "b=org/repo", '{"name": "c", "path": "/y", "base_model_name": "m"}',
                                   '{"name": "d", "path": "/z"}')
    assert config.lora_slots == 4 and config.max_lora_rank == 16
    assert load_config({}).lora_slots == 0
    for bad in ("justaname", "=x", "{not json", "[1, 2]"):
        with pytest.raises(ConfigError, match="LORA_MODULES"):
            load_config({"LORA_MODULES": bad})
    with pytest.raises(ConfigError, match="MAX_LORA_RANK.*one of 1, 8, 16"):
        load_config({"MAX_LORA_RANK": "12"})


@pytest.mark.parametrize("platform, max_loras", [("cuda", 2), ("cpu", 4)])
def test_lora_modules_turn_lora_on_in_the_engine_and_nothing_without(tiny_model_dir, monkeypatch, platform,
                                                                     max_loras):
    monkeypatch.setattr("gams_worker.startup.engine.platform_name", lambda: platform)
    assert "enable_lora" not in engine_kwargs(config_with(tiny_model_dir), "full", tiny_model_dir)
    config = config_with(tiny_model_dir, LORA_MODULES="a=/x b=/y c=/z", MAX_LORAS="2", MAX_LORA_RANK="32")
    kwargs = engine_kwargs(config, "full", tiny_model_dir)
    # On CPU a spare slot beyond every adapter: vLLM's CPU ops give base requests the last slot's weights.
    assert (kwargs["enable_lora"], kwargs["max_loras"], kwargs["max_lora_rank"], kwargs["max_cpu_loras"]) == (
        True, max_loras, 32, max(max_loras, 3))


def test_the_memory_model_counts_the_adapter_slots():
    # GaMS-9B: q, k, v, o, gate, up, down of 42 layers, A and B at rank 16, bf16: about 108 MB an adapter.
    plain, with_four = GEMMA2_9B.memory(int(17.2 * GIB)), GEMMA2_9B.memory(int(17.2 * GIB), lora_ranks=4 * 16)
    assert with_four.adapter_bytes == 2 * (4 * 16 * 42 * 80384 * 2)  # the slots, and as much in graphs
    assert plain.kv_budget(80 * GIB, 0.9) - with_four.kv_budget(80 * GIB, 0.9) == with_four.adapter_bytes


def test_the_card_plan_counts_the_adapter_slots():
    from gams_worker.presets import PRESETS
    from gams_worker.startup.card_plan import Card, plan_card

    card, preset = Card("NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB, 79 * GIB), PRESETS["cjvt/gams-9b-instruct"]
    model = {"MODEL_NAME": "cjvt/GaMS-9B-Instruct"}
    plain = plan_card(load_config(model), preset, card)
    # 4 slots at rank 512: 13 GiB of LoRA buffers off the KV cache.
    lora = plan_card(load_config({**model, "LORA_MODULES": "a=/a b=/b c=/c d=/d", "MAX_LORA_RANK": "512"}), preset,
                     card)
    assert plain.max_model_len == lora.max_model_len and lora.sequences < plain.sequences * 0.8


# --- the start checks: each refusal one line naming the adapter ---------------------------------


def test_a_whole_adapter_for_this_model_is_located(tiny_model_dir, adapters):
    config = config_with(tiny_model_dir, LORA_MODULES=f"sl={adapters['sl']} "
                         + json.dumps({"name": "legal", "path": adapters["legal"], "base_model_name": "x"}))
    modules = locate_adapters(config, tiny_model_dir)
    assert [(m.name, m.path, m.base_model_name) for m in modules] == [
        ("sl", adapters["sl"], None), ("legal", adapters["legal"], "x")]


def test_an_adapter_in_the_volumes_hub_cache_is_found_and_a_damaged_copy_refused(tiny_model_dir, adapters,
                                                                                  tmp_path):
    snapshot = tmp_path / "vol" / "huggingface-cache" / "hub" / "models--cjvt--gams-sl-lora" / "snapshots" / "c0"
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / name).write_bytes((Path(adapters["sl"]) / name).read_bytes())
    env = dict(LORA_MODULES="sl=cjvt/gams-sl-lora", NETWORK_VOLUME_PATH=str(tmp_path / "vol"),
               HF_HUB_CACHE=str(tmp_path / "empty"))
    assert locate_adapters(config_with(tiny_model_dir, **env), tiny_model_dir)[0].path == str(snapshot)
    weights = snapshot / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match=r"^LoRA adapter 'sl' \(LORA_MODULES\): .*truncated|has \d+ bytes"):
        locate_adapters(config_with(tiny_model_dir, **env), tiny_model_dir)


@pytest.mark.parametrize("case, build, reason", [
    ("another base model", dict(base_model="cjvt/GaMS-27B-Instruct"), "made for cjvt/GaMS-27B-Instruct"),
    ("rank above the maximum", dict(rank=32), "rank 32 is above MAX_LORA_RANK=16"),
    ("a module Gemma 2 has no LoRA for", dict(extra="base_model.model.lm_head.lora_A.weight"),
     "targets base_model.model.lm_head.lora_A.weight: vLLM serves LoRA on Gemma 2's q_proj, "),
    ("weights of another shape", dict(shaped=True), r"\S+ of shape \[256, 8\] does not fit this model's layer 0"),
    ("a missing folder", None, "no adapter folder at "),
    ("DoRA", dict(config={"use_dora": True}), "vLLM does not yet support DoRA"),
])
def test_an_adapter_that_cannot_be_served_stops_the_start_naming_it(tiny_model_dir, tmp_path, case, build, reason):
    folder = tmp_path / "bad"
    if build is not None:
        _bad_adapter(tiny_model_dir, folder, tmp_path, **build)
    config = config_with(tiny_model_dir, LORA_MODULES=f"bad={folder}")
    with pytest.raises(AdapterError, match=f"^LoRA adapter 'bad' \\(LORA_MODULES\\): {reason}") as caught:
        locate_adapters(config, tiny_model_dir)
    assert "\n" not in str(caught.value), case


def _bad_adapter(model_dir: str, folder: Path, tmp_path: Path, rank: int = 8, base_model=None, extra=None,
                 shaped=False, config=None) -> None:
    from safetensors.torch import load_file, save_file

    source = model_dir
    if shaped:  # the tiny model's layout, wider
        other = json.loads((Path(model_dir) / "config.json").read_text())
        (tmp_path / "wider").mkdir()
        (tmp_path / "wider" / "config.json").write_text(json.dumps({**other, "hidden_size": 256}))
        source = str(tmp_path / "wider")
    lora_adapter.build(source, str(folder), rank=rank, base_model=base_model or model_dir)
    if extra:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        save_file({**tensors, extra: next(iter(tensors.values())).clone()}, str(folder / "adapter_model.safetensors"))
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))


def test_a_name_taken_twice_or_by_the_model_is_refused(tiny_model_dir, adapters):
    for modules in (f"a={adapters['sl']} a={adapters['legal']}", f"{tiny_model_dir}={adapters['sl']}"):
        with pytest.raises(AdapterError, match="name is taken"):
            locate_adapters(config_with(tiny_model_dir, LORA_MODULES=modules), tiny_model_dir)


def test_a_job_naming_an_adapter_not_served_is_a_not_found_error_naming_the_field():
    adapters = Adapters(["sl"], ["gams", "cjvt/gams"], lambda: None)
    assert adapters.choose(None) is None and adapters.choose(("model", "gams")) is None
    assert adapters.choose(("lora", "sl")) == "sl"
    with pytest.raises(JobInputError) as caught:
        adapters.choose(("lora", "legal"))
    error = json.loads(caught.value.to_output()["error"])
    assert error == {"type": "not_found", "field": "lora",
                     "message": "no model or LoRA adapter 'legal' is served here; served: gams, sl"}


# --- the worker under the SDK loop --------------------------------------------------------------


class Served:
    """The queue worker (emulator, its OpenAI proxy's client), the HTTP worker's client, vLLM's reference texts."""

    def __init__(self, emulator, client, http_client, reference):
        self.emulator, self.client, self.http_client, self.reference = emulator, client, http_client, reference


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapters, tmp_path_factory):
    """One worker under the SDK loop and one on PORT (a load-balancing endpoint), both with the two adapters;
    vLLM's LLM makes the reference meanwhile, in a process of its own."""
    cwd = tmp_path_factory.mktemp("lora-worker")
    cases = [[PROMPT, name, adapters.get(name), TOKENS] for name in (None, "sl", "legal")]
    reference = subprocess.Popen([sys.executable, "-m", "tests.harness.lora_reference", tiny_model_dir,
                                  str(cwd / "reference.json"), json.dumps(cases)], cwd=ROOT,
                                 env=subprocess_env(VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1"),
                                 stdout=subprocess.DEVNULL, stderr=open(cwd / "reference.stderr", "wb"))
    emulator = RunPodEmulator(hold_s=1.0)
    emulator.start()
    proxy = OpenAIProxy(emulator)
    base_url = proxy.start()
    modules = f"sl={adapters['sl']} " + json.dumps({"name": "legal", "path": adapters["legal"]})
    worker = start_platform_worker(emulator, tiny_model_dir, cwd, "lora-worker", LORA_MODULES=modules)
    port = free_port()
    http_worker = WorkerProcess(subprocess_env(**engine_env(
        tiny_model_dir, PORT=str(port), LORA_MODULES=modules, MAX_MODEL_LEN="4096", GPU_MEMORY_UTILIZATION="0.05")),
        cwd, "lora-http-worker")
    try:
        assert reference.wait(START_TIMEOUT_S) == 0, (cwd / "reference.stderr").read_text()[-3000:]
        texts = json.loads((cwd / "reference.json").read_text())
        wait_for_first_take(emulator, worker)
        wait_until(lambda: _ping(port) == 200, START_TIMEOUT_S, "/ping 200", http_worker, step=0.2)
        client = openai.OpenAI(base_url=base_url, api_key="emulated-key", max_retries=0, timeout=300)
        http_client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=300)
        yield Served(emulator, client, http_client, dict(zip((None, "sl", "legal"), texts)))
    finally:
        reference.kill()
        http_worker.kill_group()
        worker.terminate()
        proxy.close()
        emulator.close()


def _ping(port: int):
    try:
        return requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code
    except requests.ConnectionError:
        return None


def plain_job(**fields):
    return {"prompt": PROMPT, "sampling_params": {"max_tokens": TOKENS, "temperature": 0, "ignore_eos": True},
            **fields}


def text_of(record) -> str:
    assert record.result is not None and "output" in record.result, record.result
    return "".join(choice["text"] for output in record.result["output"] for choice in output["choices"])


@pytest.mark.engine
def test_base_and_adapter_jobs_side_by_side_answer_as_vllm_does(served):
    emulator, reference = served.emulator, served.reference
    inputs = [plain_job(), plain_job(lora="sl"), plain_job(model="legal")] * 2
    records = [emulator.wait_result(record.id, 180) for record in emulator.submit_many(inputs)]
    texts = [text_of(record) for record in records]
    assert texts[:3] == texts[3:]  # the same on every run
    assert texts[:3] == [reference[None], reference["sl"], reference["legal"]]
    assert len(set(texts[:3])) == 3  # each adapter answers other than the model
    assert [record.result["output"][-1]["model"] for record in records[:3]][1:] == ["sl", "legal"]


@pytest.mark.engine
@pytest.mark.parametrize("endpoint", ["queue", "http"])
def test_openai_model_names_the_adapter_and_models_lists_them_with_their_parent(served, tiny_model_dir, endpoint):
    client, reference = served.client if endpoint == "queue" else served.http_client, served.reference
    models = {model.id: model for model in client.models.list()}
    assert set(models) == {tiny_model_dir, "sl", "legal"}
    assert models["sl"].model_extra["parent"] == models["legal"].model_extra["parent"] == tiny_model_dir
    for model, name in (("sl", "sl"), ("legal", "legal"), (tiny_model_dir, None)):
        answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert (answer.choices[0].text, answer.model) == (reference[name], model)


@pytest.mark.engine
def test_an_adapter_not_served_is_a_404_in_both_dialects(served):
    emulator, client = served.emulator, served.client
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="medical", prompt=PROMPT, max_tokens=4)
    assert "medical" in caught.value.message and caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):  # over HTTP too
        served.http_client.completions.create(model="medical", prompt=PROMPT, max_tokens=4)
    record = emulator.wait_result(emulator.submit(plain_job(lora="medical")), 60)
    error = json.loads(record.result["error"])
    assert (error["type"], error["field"]) == ("not_found", "lora") and "'medical'" in error["message"]


@pytest.mark.engine
def test_a_worker_with_an_adapter_for_another_model_stops_before_the_engine(tiny_model_dir, tmp_path):
    lora_adapter.build(tiny_model_dir, str(tmp_path / "other"), base_model="cjvt/GaMS-27B-Instruct")
    env = subprocess_env(**engine_env(tiny_model_dir, LORA_MODULES=f"other={tmp_path / 'other'}"))
    worker = WorkerProcess(env, tmp_path, "bad-adapter", args=("--test_input", "{}"))
    assert worker.proc.wait(START_TIMEOUT_S) == 1, worker.tail()
    assert ("gams-worker: LoRA adapter 'other' (LORA_MODULES): made for cjvt/GaMS-27B-Instruct, not for this "
            "worker's model") in worker.stderr()
    assert "starting vLLM engine" not in worker.stderr() + worker.stdout()
