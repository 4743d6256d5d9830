"""Weight prefetch: the model's weight files are read into the page cache in the background, bounded."""

import json
import os
from pathlib import Path

import pytest

from gams_worker.config import load_config
from gams_worker.startup import weight_prefetch
from gams_worker.startup.weight_prefetch import WeightPrefetch, page_cache_room, plan_weight_prefetch
from tests.harness.page_cache import evict, resident_fraction

MIB = 2**20


def model_dir(tmp_path: Path, shard_mib=(3, 5, 2)) -> Path:
    """A model folder as a sharded checkpoint lays it out: an index naming the shards."""
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    names = [f"model-{i + 1:05d}-of-{len(shard_mib):05d}.safetensors" for i in range(len(shard_mib))]
    for name, mib in zip(names, shard_mib):
        (folder / name).write_bytes(os.urandom(mib * MIB))
        evict(folder / name)  # as after a reboot: nothing of them in the page cache
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"layer{i}": name for i, name in enumerate(names)}}))
    (folder / "stray.safetensors").write_bytes(b"not named in the index")
    return folder


def shards(folder: Path):
    return sorted(folder.glob("model-*.safetensors"))


def page_cache_eviction_works(folder: Path) -> bool:
    return all(resident_fraction(path) < 0.5 for path in shards(folder))


def test_the_weight_files_end_up_in_the_page_cache(tmp_path):
    folder = model_dir(tmp_path)
    if not page_cache_eviction_works(folder):
        pytest.skip("this filesystem keeps evicted files cached (tmpfs?)")
    prefetch = plan_weight_prefetch(load_config({"PREFETCH_WEIGHTS": "with-imports"}), str(folder)).start()
    assert prefetch is not None and prefetch.wait(timeout=30)
    report = prefetch.report()
    assert report["outcome"] == "read all 3 weight files"
    assert report["files"] == report["files_read"] == 3  # the stray file is not in the index
    assert report["read_bytes"] == report["bytes"] == 10 * MIB
    assert all(resident_fraction(path) > 0.99 for path in shards(folder))


def test_reads_in_the_order_vllm_loads_and_stops_when_asked(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    for name in ("model-10.safetensors", "model-2.safetensors", "model-1.safetensors"):
        (folder / name).write_bytes(b"\0" * MIB)
    prefetch = plan_weight_prefetch(load_config({"PREFETCH_WEIGHTS": "with-imports"}), str(folder)).start()
    assert [path.name for path in prefetch.files] == ["model-1.safetensors", "model-2.safetensors",
                                                      "model-10.safetensors"]
    prefetch.wait(timeout=30)

    stopped = WeightPrefetch(shards(model_dir(tmp_path / "second")), budget_bytes=2**40, chunk_bytes=MIB)
    stopped.stop("vLLM started loading the weights")  # before the thread reads anything
    stopped.start()
    assert stopped.wait(timeout=30)
    assert stopped.report()["read_bytes"] == 0
    assert stopped.report()["outcome"] == "stopped: vLLM started loading the weights"


def test_reads_no_more_than_the_page_cache_has_room_for(tmp_path):
    folder = model_dir(tmp_path)
    prefetch = WeightPrefetch(shards(folder), budget_bytes=4 * MIB, chunk_bytes=MIB).start()
    assert prefetch.wait(timeout=30)
    report = prefetch.report()
    assert report["read_bytes"] == 4 * MIB
    assert report["files_read"] == 1  # the first shard (3 MiB) whole, the second begun
    assert report["outcome"].startswith("stopped: page cache room of 0.00 GB read")


def test_page_cache_room_is_memavailable_capped_by_the_container_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    assert page_cache_room(str(meminfo), ()) == 20000000 * 1024
    limit.write_text("max\n")
    usage.write_text("123\n")
    assert page_cache_room(str(meminfo), ((str(limit), str(usage)),)) == 20000000 * 1024
    limit.write_text(f"{16 * 2**30}\n")
    usage.write_text(f"{6 * 2**30}\n")
    assert page_cache_room(str(meminfo), ((str(limit), str(usage)),)) == 10 * 2**30
    assert page_cache_room(str(tmp_path / "absent"), ()) is None


def test_no_room_or_turned_off_reads_nothing(tmp_path, monkeypatch):
    folder = model_dir(tmp_path)
    assert plan_weight_prefetch(load_config({}), str(folder)) is None  # off by default
    assert plan_weight_prefetch(load_config({"PREFETCH_WEIGHTS": "off"}), str(folder)) is None
    monkeypatch.setattr(weight_prefetch, "page_cache_room", lambda: weight_prefetch.RESERVE_BYTES)
    skipped = plan_weight_prefetch(load_config({"PREFETCH_WEIGHTS": "after-imports"}), str(folder)).start()
    assert skipped.report()["outcome"] == "skipped: no page cache room"
    assert skipped.wait(timeout=1) and skipped.report()["read_bytes"] == 0
