"""A small Hugging Face hub on 127.0.0.1 for tests: the real huggingface_hub client talks to it.

It answers the calls snapshot_download and HfApi make, in the hub's HTTP shape:

    GET  /api/models/{repo}[/revision/{rev}]          model info (sha, siblings)
    GET  /api/models/{repo}/tree/{rev}?recursive=...   file list with sizes and LFS sha256
    HEAD/GET /{repo}/resolve/{rev}/{path}              file metadata headers / the bytes

Each repo has one commit. ``served`` lets a test serve other bytes for a file than the
listing describes (a corrupt download). Every request is recorded with its Authorization
header. A repo made with ``token=...`` answers 401 without that bearer token, like a gated repo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf")


@dataclasses.dataclass
class Repo:
    files: Dict[str, bytes]
    commit: str
    token: Optional[str] = None
    served: Dict[str, bytes] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Request:
    method: str
    path: str
    authorization: Optional[str]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, port: int = 0) -> None:
        self.repos: Dict[str, Repo] = {}
        self.requests: List[Request] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def do_GET(self) -> None:
                hub._handle(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: Dict[str, bytes], token: Optional[str] = None,
                 served: Optional[Dict[str, bytes]] = None) -> str:
        """Publish ``files`` as ``repo_id``; returns its commit hash."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        commit = digest.hexdigest()
        self.repos[repo_id] = Repo(dict(files), commit, token, dict(served or {}))
        return commit

    def fetched(self, repo_id: str) -> List[str]:
        """Paths in ``repo_id`` whose bytes were requested (GET of resolve/)."""
        prefix = f"/{repo_id}/resolve/"
        return [r.path[len(prefix):].split("/", 1)[1] for r in self.requests
                if r.method == "GET" and r.path.startswith(prefix)]

    # --- request handling ---

    def _handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlparse(request.path)
        path = unquote(url.path)
        self.requests.append(Request(request.command, path, request.headers.get("Authorization")))
        if path.startswith("/api/models/"):
            self._api(request, path[len("/api/models/"):], body)
        elif "/resolve/" in path:
            self._resolve(request, path, body)
        else:
            self._send(request, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)

    def _repo(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str, body: bool) -> Optional[Repo]:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(request, 404, b'{"error": "Repository not found"}',
                       {"X-Error-Code": "RepositoryNotFound"}, body)
            return None
        if repo.token and request.headers.get("Authorization") != f"Bearer {repo.token}":
            self._send(request, 401, b'{"error": "Access to this model is restricted"}',
                       {"X-Error-Code": "GatedRepo"}, body)
            return None
        if revision not in ("main", repo.commit):
            self._send(request, 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, body)
            return None
        return repo

    def _api(self, request: BaseHTTPRequestHandler, rest: str, body: bool) -> None:
        parts = rest.split("/")
        repo_id = "/".join(parts[:2])
        tail = parts[2:]
        if not tail or tail[0] == "revision":
            repo = self._repo(request, repo_id, tail[1] if len(tail) > 1 else "main", body)
            if repo:
                info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                        "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
                self._send_json(request, info, body)
        elif tail[0] == "tree":
            repo = self._repo(request, repo_id, tail[1], body)
            if repo:
                self._send_json(request, [self._tree_entry(name, data) for name, data in sorted(repo.files.items())], body)
        else:
            self._send(request, 404, b"{}", {}, body)

    @staticmethod
    def _tree_entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _resolve(self, request: BaseHTTPRequestHandler, path: str, body: bool) -> None:
        repo_part, rest = path[1:].split("/resolve/", 1)
        revision, name = rest.split("/", 1)
        repo = self._repo(request, repo_part, revision, body)
        if repo is None:
            return
        if name not in repo.files:
            self._send(request, 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound",
                                                                      "X-Repo-Commit": repo.commit}, body)
            return
        listed = repo.files[name]
        data = repo.served.get(name, listed)
        etag = hashlib.sha256(listed).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_sha1(listed)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        status, data = self._range(request, data, headers)
        self._send(request, status, data, headers, body)

    @staticmethod
    def _range(request: BaseHTTPRequestHandler, data: bytes, headers: Dict[str, str]) -> Tuple[int, bytes]:
        spec = request.headers.get("Range")
        if not spec or not spec.startswith("bytes="):
            return 200, data
        start_text, _, end_text = spec[len("bytes="):].partition("-")
        start = int(start_text or 0)
        end = int(end_text) if end_text else len(data) - 1
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return 206, data[start:end + 1]

    def _send_json(self, request: BaseHTTPRequestHandler, payload, body: bool) -> None:
        self._send(request, 200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, data: bytes, headers: Dict[str, str], body: bool) -> None:
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)


def model_files(model_dir) -> Dict[str, bytes]:
    """The files of a local model folder, as a repo's contents."""
    from pathlib import Path

    root = Path(model_dir)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sharded(files: Dict[str, bytes]) -> Dict[str, bytes]:
    """The same repo with model.safetensors split into two shards plus their index."""
    from safetensors import safe_open
    from safetensors.torch import save

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "model.safetensors"
        single.write_bytes(files["model.safetensors"])
        with safe_open(str(single), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    out = {k: v for k, v in files.items() if k != "model.safetensors"}
    weight_map = {}
    total = 0
    for shard, shard_names in halves.items():
        out[shard] = save({n: tensors[n] for n in shard_names}, metadata={"format": "pt"})
        weight_map.update({n: shard for n in shard_names})
        total += sum(tensors[n].numel() * tensors[n].element_size() for n in shard_names)
    out["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
    return out
