"""Bake a model into the image at build time: download, check, and write the manifest.

    python -m builder.download_model --model cjvt/GaMS-9B-Instruct --revision main \
        --out /models --token-file /run/secrets/hf_token

Fetches only the files vLLM needs (gams_worker.startup.model_files.ALLOW_PATTERNS) at the commit the
revision resolves to, checks that every shard is there and whole (sizes and the hub's sha256
of each LFS file), then writes OUT/manifest.json, which the worker reads at start to serve
this copy with the hub offline. The token comes from a file (a BuildKit secret, never stored
in a layer) or HF_TOKEN; it is passed to the hub client and never printed or written.
An empty --model bakes nothing and exits 0, so one Dockerfile builds both image kinds.
The hub address comes from HF_ENDPOINT, which huggingface_hub reads itself.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from the image's /app
    sys.path.insert(0, str(ROOT))

from gams_worker.startup.model_files import (  # noqa: E402
    ALLOW_PATTERNS,
    IGNORE_PATTERNS,
    MANIFEST_NAME,
    BakedManifest,
    find_problems,
    write_manifest,
)


class BakeError(Exception):
    """The bake cannot produce a whole model; the message says what is wrong."""


def say(message: str) -> None:
    print(f"bake: {message}", file=sys.stderr, flush=True)


def read_token(token_file: Optional[str]) -> Optional[str]:
    """The token from the secret file if it has one, else HF_TOKEN, else None (public repo)."""
    if token_file and Path(token_file).is_file():
        token = Path(token_file).read_text().strip()
        if token:
            return token
    return os.environ.get("HF_TOKEN", "").strip() or None


def model_dir_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(16 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def bake(repo_id: str, revision: str, out: Path, token: Optional[str]) -> BakedManifest:
    """Download ``repo_id`` at ``revision`` into ``out`` and write its manifest there."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi(token=token)
    commit = api.model_info(repo_id, revision=revision).sha
    if not commit:
        raise BakeError(f"the hub gave no commit for {repo_id}@{revision}")
    say(f"{repo_id}@{revision} is commit {commit}")
    entries = [e for e in api.list_repo_tree(repo_id, revision=commit, recursive=True) if isinstance(e, RepoFile)]
    by_path = {e.path: e for e in entries}
    wanted = sorted(filter_repo_objects(by_path, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    if not any(path.endswith(".safetensors") for path in wanted):
        raise BakeError(f"{repo_id}@{commit} has no .safetensors weights; this worker serves only safetensors")
    sizes: Dict[str, int] = {path: by_path[path].size for path in wanted}
    total_gb = sum(sizes.values()) / 1e9
    say(f"fetching {len(wanted)} files, {total_gb:.2f} GB: {', '.join(wanted)}")
    skipped = sorted(set(by_path) - set(wanted))
    if skipped:
        say(f"leaving out {len(skipped)} files not needed by vLLM: {', '.join(skipped)}")

    model_dir = out / model_dir_name(repo_id)
    started = time.monotonic()
    snapshot_download(
        repo_id,
        revision=commit,
        local_dir=model_dir,
        allow_patterns=wanted,  # the exact list checked above, so nothing else slips in
        token=token,
        max_workers=8,
    )
    say(f"downloaded in {time.monotonic() - started:.0f} s; checking")

    problems: List[str] = find_problems(model_dir, sizes)
    for path in wanted:
        lfs = by_path[path].lfs
        local = model_dir / path
        if lfs is not None and local.is_file() and sha256_of(local) != lfs.sha256:
            problems.append(f"{path} does not match the hub's sha256 {lfs.sha256}")
    if problems:
        raise BakeError("the downloaded model is incomplete: " + "; ".join(problems))

    manifest = BakedManifest(
        repo_id=repo_id, revision=revision, commit=commit, model_dir=model_dir.name, files=sizes
    )
    write_manifest(out / MANIFEST_NAME, manifest)
    say(f"baked {repo_id}@{commit} into {model_dir}; manifest {out / MANIFEST_NAME}")
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="hub repo id; empty bakes nothing")
    parser.add_argument("--revision", default="main", help="branch, tag or commit (pin a commit for releases)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the model and manifest.json")
    parser.add_argument("--token-file", default=None, help="file holding the hub token (a build secret)")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    if not args.model.strip():
        say("no model given: baking nothing (the worker will use the cache or the hub at start)")
        return 0
    try:
        bake(args.model.strip(), args.revision.strip() or "main", args.out, read_token(args.token_file))
    except BakeError as exc:
        say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
