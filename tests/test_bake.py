"""The image's bake step (builder/download_model.py) with the real huggingface_hub client
against a local hub (tests/harness/fake_hub.py), and a worker started offline from its manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest

from gams_worker.startup.model_files import read_manifest
from tests.harness.worker_process import ROOT, engine_env, subprocess_env
from tests.harness.fake_hub import FakeHub, model_files, sharded

TOKEN = "hf_bakeTestTokenThatMustNeverBeLogged0123"
NEEDED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja"}


@pytest.fixture(scope="module")
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tiny_files(tiny_model_dir) -> Dict[str, bytes]:
    return model_files(tiny_model_dir)


def run_bake(hub: FakeHub, tmp_path: Path, repo_id: str, revision: str = "main",
             token: Optional[str] = None) -> subprocess.CompletedProcess:
    token_file = tmp_path / "secret-hf-token"
    args = [sys.executable, "-m", "builder.download_model", "--model", repo_id, "--revision", revision,
            "--out", str(tmp_path / "models")]
    if token:
        token_file.write_text(token + "\n")
        args += ["--token-file", str(token_file)]
    env = subprocess_env(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"),
                         HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_TOKEN", None)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def files_under(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def test_bake_fetches_only_what_vllm_needs_with_the_token_kept_secret(hub, tiny_files, tmp_path):
    files = sharded(tiny_files)
    files["pytorch_model.bin"] = b"decoy duplicate weights" * 100
    files["original/consolidated.00.pth"] = b"decoy original checkpoint" * 100
    files["README.md"] = b"# tiny GaMS"
    commit = hub.add_repo("cjvt/GaMS-tiny-gated", files, token=TOKEN)

    result = run_bake(hub, tmp_path, "cjvt/GaMS-tiny-gated", token=TOKEN)
    assert result.returncode == 0, result.stderr

    shards = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
              "model.safetensors.index.json"}
    model_dir = tmp_path / "models" / "cjvt--GaMS-tiny-gated"
    assert files_under(model_dir) == NEEDED | shards
    for name in NEEDED | shards:
        assert (model_dir / name).read_bytes() == files[name], name
    assert not {"pytorch_model.bin", "original/consolidated.00.pth", "README.md"} & set(hub.fetched("cjvt/GaMS-tiny-gated"))
    # Every hub call carried the token: the gated repo answers 401 otherwise.
    assert any(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)

    manifest = read_manifest(tmp_path / "models" / "manifest.json")
    assert (manifest.repo_id, manifest.revision, manifest.commit) == ("cjvt/GaMS-tiny-gated", "main", commit)
    assert manifest.model_dir == "cjvt--GaMS-tiny-gated"
    assert manifest.files == {name: len(files[name]) for name in NEEDED | shards}
    assert "bake: fetching 8 files" in result.stderr  # progress is reported

    assert TOKEN not in result.stdout + result.stderr
    for path in (tmp_path / "models").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_bake_without_the_token_fails_for_a_gated_repo(hub, tiny_files, tmp_path):
    hub.add_repo("cjvt/GaMS-tiny-gated2", tiny_files, token=TOKEN)
    result = run_bake(hub, tmp_path, "cjvt/GaMS-tiny-gated2")
    assert result.returncode != 0
    assert not (tmp_path / "models" / "manifest.json").exists()


def test_bake_detects_a_shard_missing_from_the_repo(hub, tiny_files, tmp_path):
    files = sharded(tiny_files)
    del files["model-00002-of-00002.safetensors"]
    hub.add_repo("cjvt/GaMS-tiny-missing-shard", files)
    result = run_bake(hub, tmp_path, "cjvt/GaMS-tiny-missing-shard")
    assert result.returncode == 1
    assert "model-00002-of-00002.safetensors" in result.stderr and "missing" in result.stderr
    assert not (tmp_path / "models" / "manifest.json").exists()


def test_bake_detects_a_corrupt_download_of_the_right_size(hub, tiny_files, tmp_path):
    files = sharded(tiny_files)
    shard = "model-00001-of-00002.safetensors"
    damaged = bytearray(files[shard])
    damaged[-10] ^= 0xFF  # a flipped byte in the tensor data: size and header still fine
    hub.add_repo("cjvt/GaMS-tiny-corrupt", files, served={shard: bytes(damaged)})
    result = run_bake(hub, tmp_path, "cjvt/GaMS-tiny-corrupt")
    assert result.returncode == 1
    assert f"{shard} does not match the hub's sha256" in result.stderr
    assert not (tmp_path / "models" / "manifest.json").exists()


def test_bake_detects_a_truncated_shard_published_as_is(hub, tiny_files, tmp_path):
    files = sharded(tiny_files)
    shard = "model-00002-of-00002.safetensors"
    files[shard] = files[shard][: len(files[shard]) // 2]  # the hub's listing agrees with the short file
    hub.add_repo("cjvt/GaMS-tiny-truncated", files)
    result = run_bake(hub, tmp_path, "cjvt/GaMS-tiny-truncated")
    assert result.returncode == 1
    assert f"{shard} has {len(files[shard])} bytes, its header says" in result.stderr


def test_bake_of_an_unknown_revision_fails(hub, tiny_files, tmp_path):
    hub.add_repo("cjvt/GaMS-tiny-rev", tiny_files)
    result = run_bake(hub, tmp_path, "cjvt/GaMS-tiny-rev", revision="v9-does-not-exist")
    assert result.returncode != 0
    assert not (tmp_path / "models" / "manifest.json").exists()


def test_empty_model_name_bakes_nothing(hub, tmp_path):
    result = run_bake(hub, tmp_path, "")
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "models").iterdir()) == []
    assert not hub.fetched("")


@pytest.mark.engine
def test_worker_starts_offline_from_the_baked_manifest_and_serves_a_job(hub, tiny_files, tmp_path):
    repo_id = "cjvt/GaMS-tiny-baked"
    commit = hub.add_repo(repo_id, tiny_files)
    bake = run_bake(hub, tmp_path, repo_id, revision=commit)
    assert bake.returncode == 0, bake.stderr
    hub.close()  # from here on there is no hub at all

    env = subprocess_env(**engine_env(
        repo_id,
        MODEL_REVISION=commit,
        BAKED_MODEL_MANIFEST=str(tmp_path / "models" / "manifest.json"),
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT=hub.url,  # closed: any hub call would fail
        HF_HOME=str(tmp_path / "empty-hf-home"),
        NETWORK_VOLUME_PATH=str(tmp_path / "no-volume"),
    ))
    env.pop("HF_HUB_CACHE", None)
    job = {"input": {"prompt": "Ljubljana je", "sampling_params": {"max_tokens": 8, "temperature": 0}}}
    result = subprocess.run([sys.executable, "handler.py", "--test_input", json.dumps(job)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    model_dir = (tmp_path / "models" / "cjvt--GaMS-tiny-baked").resolve()
    assert f"model {repo_id}: using the baked copy at {model_dir}" in result.stderr
    aggregate = json.loads(result.stdout.split("--- aggregate output:", 1)[1].strip().splitlines()[0])
    outputs = aggregate["output"]
    assert outputs and not any("error" in o for o in outputs)
    assert repo_id in json.dumps(outputs)  # the model users see is the repo id, not the local path
