"""Model resolution at worker start: baked copy, then RunPod's cache / volume, then the
machine's HF cache, then the hub (a local fake hub with the real client). No engine."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gams_worker.config import load_config
from gams_worker.errors import IncompleteModelError, ModelNotFoundError
from gams_worker.startup.model_files import BakedManifest, find_problems, write_manifest
from gams_worker.startup.doctor import run_doctor
from gams_worker.startup.host import HostFacts
from gams_worker.startup.model import BAKED, HUB, LOCAL, MACHINE_CACHE, RUNPOD_CACHE, find_local_model, resolve_model
from tests.harness.fake_hub import FakeHub, model_files
from tests.harness.worker_process import ROOT, engine_env, subprocess_env

REPO = "cjvt/GaMS-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def places(tmp_path):
    """Config pointing every place at empty folders under tmp_path, the hub offline."""
    config = load_config({
        "MODEL_NAME": REPO,
        "BAKED_MODEL_MANIFEST": str(tmp_path / "models" / "manifest.json"),
        "NETWORK_VOLUME_PATH": str(tmp_path / "runpod-volume"),
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "HF_HUB_OFFLINE": "1",
    })
    return config


def bake_copy(tiny_model_dir: str, config, repo: str = REPO) -> Path:
    model_dir = Path(config.baked_model_manifest).parent / repo.replace("/", "--")
    shutil.copytree(tiny_model_dir, model_dir)
    sizes = {p.name: p.stat().st_size for p in model_dir.iterdir()}
    write_manifest(Path(config.baked_model_manifest),
                   BakedManifest(repo_id=repo, revision="main", commit=COMMIT, model_dir=model_dir.name, files=sizes))
    return model_dir


def cache_copy(tiny_model_dir: str, cache_dir: Path, with_ref: bool = True) -> Path:
    repo_dir = cache_dir / ("models--" + REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    shutil.copytree(tiny_model_dir, snapshot)
    if with_ref:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_order_is_baked_then_runpod_cache_then_machine_cache(tiny_model_dir, places, caplog):
    baked = bake_copy(tiny_model_dir, places)
    runpod = cache_copy(tiny_model_dir, Path(places.network_volume_path) / "huggingface-cache" / "hub",
                        with_ref=False)  # RunPod's cache may hold a lone snapshot without refs
    machine = cache_copy(tiny_model_dir, Path(places.hf_hub_cache))

    with caplog.at_level(logging.INFO, logger="gams_worker.startup.model"):
        found = resolve_model(places)
    assert (found.path, found.source, found.commit) == (str(baked.resolve()), BAKED, COMMIT)
    assert f"model {REPO}: using the baked copy at {baked.resolve()}" in caplog.text

    Path(places.baked_model_manifest).unlink()
    found = resolve_model(places)
    assert (found.path, found.source) == (str(runpod), RUNPOD_CACHE)

    shutil.rmtree(runpod)
    found = resolve_model(places)
    assert (found.path, found.source) == (str(machine), MACHINE_CACHE)


def test_the_doctor_sizes_the_copy_the_engine_will_load_baked_or_on_the_volume(tiny_model_dir, places):
    # The doctor once looked only in the machine's Hugging Face cache: "model memory: unknown"
    # in the baked image. It now reads the copy the one locator finds.
    assert find_local_model(places) is None  # nothing here yet; nothing downloaded either
    for copy in (lambda: bake_copy(tiny_model_dir, places),
                 lambda: cache_copy(tiny_model_dir, Path(places.network_volume_path) / "huggingface-cache" / "hub")):
        shutil.rmtree(Path(places.baked_model_manifest).parent, ignore_errors=True)
        copy()
        local = find_local_model(places)
        assert local == resolve_model(places)
        report = run_doctor(places, HostFacts("cpu"), local.path)
        assert any(line.startswith("model needs ~") for line in report.lines), report.lines


def test_nothing_found_offline_names_every_place_searched(places):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(places)
    message = str(caught.value)
    assert places.baked_model_manifest in message
    assert str(Path(places.network_volume_path) / "huggingface-cache" / "hub") in message
    assert places.hf_hub_cache in message
    assert "HF_HUB_OFFLINE" in message
    assert len(caught.value.searched) == 4


def test_a_baked_copy_of_another_model_or_revision_is_passed_over(tiny_model_dir, places):
    bake_copy(tiny_model_dir, places, repo="cjvt/Other-Model")
    with pytest.raises(ModelNotFoundError, match="holds cjvt/Other-Model@main"):
        resolve_model(places)
    pinned = dataclasses.replace(places, model_name="cjvt/Other-Model", model_revision="v2")
    with pytest.raises(ModelNotFoundError, match="not cjvt/Other-Model@v2"):
        resolve_model(pinned)
    by_commit = dataclasses.replace(places, model_name="cjvt/Other-Model", model_revision=COMMIT)
    assert resolve_model(by_commit).source == BAKED


def test_an_incomplete_baked_copy_falls_through_to_the_cache(tiny_model_dir, places):
    baked = bake_copy(tiny_model_dir, places)
    (baked / "model.safetensors").unlink()
    machine = cache_copy(tiny_model_dir, Path(places.hf_hub_cache))
    assert resolve_model(places).path == str(machine)
    shutil.rmtree(machine.parent.parent)
    with pytest.raises(ModelNotFoundError, match="baked copy .*incomplete .*no .safetensors weights"):
        resolve_model(places)


def test_a_local_directory_is_used_as_it_is_and_must_be_whole(tiny_model_dir, places, tmp_path):
    local = dataclasses.replace(places, model_name=tiny_model_dir)
    assert (resolve_model(local).source, resolve_model(local).path) == (LOCAL, str(Path(tiny_model_dir).resolve()))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").unlink()
    with pytest.raises(IncompleteModelError, match="config.json is missing"):
        resolve_model(dataclasses.replace(places, model_name=str(broken)))
    absent = resolve_model(dataclasses.replace(places, model_name=str(tmp_path / "absent")))
    assert (absent.path, absent.source) == (str(tmp_path / "absent"), LOCAL)  # vLLM reports it


def test_find_problems_checks_the_index_and_each_shard(tiny_model_dir, tmp_path):
    from tests.harness.fake_hub import sharded

    model = tmp_path / "m"
    model.mkdir()
    for name, data in sharded(model_files(tiny_model_dir)).items():
        (model / name).write_bytes(data)
    assert find_problems(model) == []
    shard = model / "model-00002-of-00002.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-1])
    assert find_problems(model) == [f"{shard.name} has {len(whole) - 1} bytes, its header says {len(whole)}"]
    shard.unlink()
    assert find_problems(model) == [f"shard {shard.name} (named in model.safetensors.index.json) is missing"]
    assert find_problems(model, {"tokenizer.json": 1})[-1].startswith("tokenizer.json has ")


@pytest.fixture
def hub(monkeypatch):
    # scripts/test.sh sets HF_HUB_OFFLINE=1, which huggingface_hub read at import; these
    # tests go online (to a local hub) in this process, as a worker without it set would.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = FakeHub()
    yield server
    server.close()


def test_hub_download_goes_to_the_volume_cache_when_a_volume_is_mounted(tiny_model_dir, places, hub, caplog):
    commit = hub.add_repo(REPO, {**model_files(tiny_model_dir), "pytorch_model.bin": b"decoy"})
    online = dataclasses.replace(places, hub_offline=False, hf_endpoint=hub.url)
    Path(online.network_volume_path).mkdir()
    with caplog.at_level(logging.INFO, logger="gams_worker.startup.model"):
        found = resolve_model(online)
    volume_cache = Path(online.network_volume_path) / "huggingface-cache" / "hub"
    assert (found.source, found.commit) == (HUB, commit)
    assert Path(found.path).is_relative_to(volume_cache)
    assert "downloading from the hub" in caplog.text
    assert "pytorch_model.bin" not in hub.fetched(REPO)
    assert not (Path(found.path) / "pytorch_model.bin").exists()
    # The next start finds the volume's copy without the hub.
    hub.close()
    again = resolve_model(dataclasses.replace(places, hf_endpoint=hub.url))
    assert (again.source, again.path) == (RUNPOD_CACHE, found.path)


def test_hub_download_without_a_volume_goes_to_the_machine_cache(tiny_model_dir, places, hub):
    hub.add_repo(REPO, model_files(tiny_model_dir))
    found = resolve_model(dataclasses.replace(places, hub_offline=False, hf_endpoint=hub.url))
    assert found.source == HUB
    assert Path(found.path).is_relative_to(Path(places.hf_hub_cache))


def test_an_unreachable_hub_is_a_clear_error(places, hub):
    hub.close()
    online = dataclasses.replace(places, hub_offline=False, hf_endpoint=hub.url)
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(online)
    assert caught.value.searched[-1].startswith("the hub: ")
    assert places.baked_model_manifest in str(caught.value)


# --- partial and damaged copies: each is passed over, with one line saying why ---------------


def write_files(folder: Path, files) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def sharded_files(tiny_model_dir):
    from tests.harness.fake_hub import sharded

    return sharded(model_files(tiny_model_dir))


def test_shards_without_an_index_must_all_be_there_by_their_of_n_names(tiny_model_dir, tmp_path):
    files = sharded_files(tiny_model_dir)
    del files["model.safetensors.index.json"]
    model = write_files(tmp_path / "m", files)
    assert find_problems(model) == []
    (model / "model-00002-of-00002.safetensors").unlink()
    assert find_problems(model) == ["shard model-00002-of-00002.safetensors is missing (the -of-N naming of the "
                                    "shards present says it exists)"]
    (model / "model-00001-of-00002.safetensors").rename(model / "model-00001-of-00004.safetensors")
    assert len(find_problems(model)) == 3  # 00002, 00003 and 00004 of 4


def test_a_damaged_index_or_header_is_a_problem_never_an_exception(tiny_model_dir, tmp_path):
    files = sharded_files(tiny_model_dir)
    model = write_files(tmp_path / "m", files)
    index = model / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {"a": "model-00001-of-00002.safe')
    assert find_problems(model) == ["model.safetensors.index.json is damaged (not JSON)"]
    index.write_text(json.dumps({"metadata": {}}))
    assert find_problems(model) == ["model.safetensors.index.json is damaged (no weight_map)"]
    weight_map = json.loads(files["model.safetensors.index.json"])["weight_map"]
    moved = sorted(weight_map)[0]
    index.write_text(json.dumps({"weight_map": {**weight_map, moved: "model-00002-of-00002.safetensors"}}))
    assert find_problems(model) == [f"model-00002-of-00002.safetensors lacks 1 of the tensors "
                                    f"model.safetensors.index.json places in it (first: {moved})"]
    index.write_bytes(files["model.safetensors.index.json"])

    shard = model / "model-00001-of-00002.safetensors"
    whole = shard.read_bytes()
    header_len = struct.unpack("<Q", whole[:8])[0]
    header = json.loads(whole[8:8 + header_len])
    name = next(k for k in header if k != "__metadata__")

    def with_header(new_header: bytes) -> list:
        shard.write_bytes(struct.pack("<Q", len(new_header)) + new_header + whole[8 + header_len:])
        return find_problems(model)

    assert with_header(b"[1, 2]") == [f"{shard.name} has a damaged header (not a JSON object)"]
    assert with_header(b"\xff" * 10) == [f"{shard.name} has a damaged header (not JSON)"]
    bad_offsets = json.dumps({**header, name: {**header[name], "data_offsets": [5, "x"]}}).encode()
    assert with_header(bad_offsets) == [f"{shard.name} has a damaged header: tensor {name!r} has data_offsets [5, 'x']"]
    begin, end = header[name]["data_offsets"]
    short = json.dumps({**header, name: {**header[name], "data_offsets": [begin, end - 2]}}).encode()
    assert "needs" in with_header(short)[0]
    shard.write_bytes(struct.pack("<Q", 10**12) + whole[8:])
    assert find_problems(model) == [f"{shard.name} is truncated (header of {10**12} bytes, file of {len(whole)})"]
    # Any damage to the header region: a list of problems, never an exception.
    rng = random.Random(7)
    for _ in range(200):
        damaged = bytearray(whole)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(0, 8 + header_len)] = rng.randrange(256)
        shard.write_bytes(bytes(damaged))
        assert isinstance(find_problems(model), list)


def test_the_tokenizer_and_a_chat_models_template_must_be_there(tiny_model_dir, places, tmp_path):
    model = write_files(tmp_path / "m", model_files(tiny_model_dir))
    (model / "chat_template.jinja").unlink()
    assert find_problems(model) == []  # a base model need not have one
    chat_model = dataclasses.replace(places, model_name=str(model), model_preset="cjvt/gams-9b-instruct")
    with pytest.raises(IncompleteModelError, match="no chat template"):
        resolve_model(chat_model)
    (model / "tokenizer.json").unlink()
    assert find_problems(model) == ["no tokenizer vocabulary (tokenizer.json, tokenizer.model, vocab.json, "
                                    "vocab.txt or *.tiktoken)"]
    # Served with another tokenizer (TOKENIZER_NAME), the copy needs none of its own.
    assert resolve_model(dataclasses.replace(places, model_name=str(model), tokenizer_name="other/tokenizer")).source == LOCAL


def test_a_damaged_volume_copy_is_passed_over_for_the_machine_cache(tiny_model_dir, places, caplog):
    volume = cache_copy(tiny_model_dir, Path(places.network_volume_path) / "huggingface-cache" / "hub")
    machine = cache_copy(tiny_model_dir, Path(places.hf_hub_cache))
    (volume / "model.safetensors").write_bytes(b"\x00" * 7)
    (volume / "config.json").unlink()
    (volume / "config.json").symlink_to(volume.parent.parent / "blobs" / "gone")  # a pruned blob
    found = resolve_model(places)
    assert (found.source, found.path) == (MACHINE_CACHE, str(machine))
    (machine / "model.safetensors.index.json").write_text("{")  # and the last copy damaged too: one clear error
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(places)
    searched = "; ".join(caught.value.searched)
    assert "config.json is a broken link (its file is missing)" in searched
    assert "model.safetensors is truncated (7 bytes)" in searched
    assert "model.safetensors.index.json is damaged (not JSON)" in searched
    # A ref that is not text (a damaged volume) is one more place passed over, not a traceback.
    (volume.parent.parent / "refs" / "main").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ModelNotFoundError, match="unreadable"):
        resolve_model(places)


def test_a_damaged_volume_copy_the_hub_client_will_not_repair_is_downloaded_again_into_the_machine_cache(
        tiny_model_dir, places, hub, caplog):
    commit = hub.add_repo(REPO, model_files(tiny_model_dir))
    online = dataclasses.replace(places, hub_offline=False, hf_endpoint=hub.url)
    Path(online.network_volume_path).mkdir()
    first = resolve_model(online)
    assert Path(first.path).is_relative_to(Path(online.network_volume_path))
    Path(first.path, "model.safetensors").resolve().write_bytes(b"\x00" * 100)  # the blob damaged in place
    again = resolve_model(online)
    assert (again.source, again.commit) == (HUB, commit)
    assert Path(again.path).is_relative_to(Path(places.hf_hub_cache))
    assert "the download into" in caplog.text and "is not whole" in caplog.text


def test_a_read_only_volume_is_warned_about_and_the_download_goes_to_the_machine_cache(
        tiny_model_dir, places, hub, caplog):
    from tests.harness.volumes import tmpfs

    hub.add_repo(REPO, model_files(tiny_model_dir))
    online = dataclasses.replace(places, hub_offline=False, hf_endpoint=hub.url)
    with tmpfs(Path(places.network_volume_path), 1 << 20, read_only=True):
        found = resolve_model(online)
    assert found.source == HUB and Path(found.path).is_relative_to(Path(places.hf_hub_cache))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot download into the network volume" in warnings[0]
    assert "Read-only file system" in warnings[0]


def test_a_damaged_model_ends_the_worker_with_one_line_not_a_traceback(tiny_model_dir, tmp_path):
    model = write_files(tmp_path / "m", sharded_files(tiny_model_dir))
    (model / "model.safetensors.index.json").write_text("{")
    result = subprocess.run([sys.executable, "handler.py", "--test_input", '{"input": {"prompt": "x"}}'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=subprocess_env(**engine_env(str(model))))
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"gams-worker: model files in {model} are incomplete: model.safetensors.index.json is damaged (not JSON)")
    assert "Traceback" not in result.stderr
