"""The weights readahead: every byte of the model's weight files read once, in the background, unless they
would take more than half the free memory; paced until the imports are done; stopped on request."""

import time
from types import SimpleNamespace

import psutil

from gams_worker.startup import readahead
from gams_worker.startup.readahead import WeightsReadahead, weight_files


def model_folder(tmp_path, sizes=(3 << 20, (1 << 20) + 17)):
    for index, size in enumerate(sizes):
        (tmp_path / f"model-{index:05d}.safetensors").write_bytes(bytes([index + 1]) * size)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 100)  # vLLM loads safetensors where there are any
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def wait_done(ahead: WeightsReadahead, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while ahead.seconds is None:
        assert time.monotonic() < deadline, ahead.report()
        time.sleep(0.01)


def test_reads_every_byte_of_the_weight_files_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "CHUNK_BYTES", 1 << 20)
    ahead = WeightsReadahead(str(model_folder(tmp_path))).start()
    wait_done(ahead)
    assert [path.name for path in ahead.files] == ["model-00000.safetensors", "model-00001.safetensors"]
    assert ahead.read_bytes == ahead.total_bytes == (3 << 20) + (1 << 20) + 17
    assert ahead.report().startswith("done: 0.0 of 0.0 GB in ")


def paced_after_its_first_chunk(tmp_path, monkeypatch) -> WeightsReadahead:
    """A readahead paced at a byte a second: it reads its first chunk, then waits (for days)."""
    monkeypatch.setattr(readahead, "CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(readahead, "PACED_BYTES_PER_S", 1.0)
    ahead = WeightsReadahead(str(model_folder(tmp_path))).start()
    deadline = time.monotonic() + 30
    while ahead.read_bytes < 1 << 20:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert ahead.read_bytes == 1 << 20 and ahead.seconds is None and ahead._thread.is_alive()
    return ahead


def test_paced_until_the_imports_are_done(tmp_path, monkeypatch):
    ahead = paced_after_its_first_chunk(tmp_path, monkeypatch)
    ahead.imports_done()
    wait_done(ahead)
    assert ahead.read_bytes == ahead.total_bytes


def test_a_stop_ends_a_paced_wait(tmp_path, monkeypatch):
    ahead = paced_after_its_first_chunk(tmp_path, monkeypatch)
    ahead.stop()
    ahead._thread.join(10)
    assert not ahead._thread.is_alive() and ahead.seconds is None and ahead.read_bytes == 1 << 20


def test_skipped_where_the_weights_would_take_over_half_the_free_memory(tmp_path, monkeypatch, caplog):
    folder = model_folder(tmp_path)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2 * (4 << 20) - 1))
    with caplog.at_level("INFO"):
        ahead = WeightsReadahead(str(folder)).start()
    assert not ahead._thread.is_alive() and ahead.read_bytes == 0
    assert "weights readahead: skipped (0.0 GB of weights, more than 50% of the 0.0 GB of free memory)" in caplog.text


def test_a_stop_ends_the_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "CHUNK_BYTES", 1 << 10)
    ahead = WeightsReadahead(str(model_folder(tmp_path)))
    ahead.stop()  # before the first read: nothing is read
    ahead.start()
    ahead._thread.join(10)
    assert ahead.read_bytes == 0 and ahead.seconds is None and ahead.report().startswith("stopped: ")


def test_the_formats_vllm_would_load(tmp_path):
    (tmp_path / "pytorch_model-00001.bin").write_bytes(b"x")
    assert [path.name for path in weight_files(tmp_path)] == ["pytorch_model-00001.bin"]
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert [path.name for path in weight_files(tmp_path)] == ["model.safetensors"]
    assert weight_files(tmp_path / "missing") == []
