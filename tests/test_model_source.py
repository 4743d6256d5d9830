"""Model resolution at worker start: baked copy, then RunPod's cache / volume, then the
machine's HF cache, then the hub (a local fake hub with the real client). No engine."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest

from gams_worker.config import load_config
from gams_worker.errors import IncompleteModelError, ModelNotFoundError
from gams_worker.startup.model_files import BakedManifest, find_problems, write_manifest
from gams_worker.startup.doctor import run_doctor
from gams_worker.startup.host import HostFacts
from gams_worker.startup.model import BAKED, HUB, LOCAL, MACHINE_CACHE, RUNPOD_CACHE, find_local_model, resolve_model
from tests.harness.fake_hub import FakeHub, model_files

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
