"""Consumer side: download the model an alias points to, verified against its manifest.

Files land in a hidden temporary directory next to dest and are renamed into place only after
every SHA-256 matched, so dest either holds a complete, verified model or does not exist.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from qlora_flow import layout
from qlora_flow.config import S3Settings
from qlora_flow.fingerprint import sha256_file
from qlora_flow.layout import MANIFEST_NAME
from qlora_flow.store import ArtifactStore, LocalStore

# what `pull` can fetch: a part of the run's manifest (its top-level directory)
PARTS = {"model": "the merged model", "adapter": "the LoRA adapter", "gguf": "the GGUF files"}


class PullError(RuntimeError):
    """The model cannot be pulled, or what was downloaded does not verify."""


def stored_key(run: str, entry: dict) -> str:
    """Store key of a manifest entry's bytes: under the run's own directory, or at `stored_at` for a merged
    model that an earlier run stored and this run reuses (tasks/publish.py)."""
    return entry.get("stored_at") or f"{run}/{entry['path']}"


def _open(store_uri: str, s3: S3Settings | None, cache_dir: Path) -> ArtifactStore:
    if store_uri.startswith("s3://"):
        from qlora_flow.s3store import S3Store

        return S3Store.from_config(store_uri, s3 or S3Settings(), cache_dir=cache_dir)
    if not Path(store_uri).is_dir():
        raise PullError(f"artifact store {store_uri} does not exist")
    return LocalStore(store_uri)


def pull_model(store_uri: str, name: str, alias: str, dest: Path, s3: S3Settings | None = None, part: str = "model") -> Path:
    """Download one part of name:alias (model, adapter or gguf files) plus manifest.json into dest; returns dest."""
    dest = Path(dest).expanduser().resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        store = _open(store_uri, s3, staging / ".cache")
        alias_key = layout.alias_key(name, alias)
        pointer, _ = store.read_alias(alias_key)
        if pointer is None:
            raise PullError(f"{store.uri(alias_key)} does not exist: nothing is published as {name}:{alias}")
        # aliases written before manifest_key hold only the absolute URI; key_of maps it into this store
        manifest_key = pointer.get("manifest_key") or store.key_of(pointer["manifest_uri"])
        manifest_bytes = store.read_bytes(manifest_key)
        if hashlib.sha256(manifest_bytes).hexdigest() != pointer["manifest_sha256"]:
            raise PullError(f"{pointer['manifest_uri']} does not match the checksum recorded in {store.uri(alias_key)}")
        manifest = json.loads(manifest_bytes)
        if manifest["run_id"] != pointer["run_id"]:
            raise PullError(f"{name}:{alias} names run {pointer['run_id']} but its manifest is for run {manifest['run_id']}")

        if (dest / MANIFEST_NAME).is_file() and (dest / MANIFEST_NAME).read_bytes() == manifest_bytes:
            return dest  # already pulled
        if dest.exists() and any(dest.iterdir()):
            raise PullError(f"{dest} already exists and holds something else; choose an empty destination")

        run = manifest_key.rsplit("/", 1)[0]
        model_files = [f for f in manifest["files"] if f["path"].startswith(part + "/")]
        if not model_files:
            raise PullError(f"manifest of run {manifest['run_id']} lists no {part} files ({PARTS[part]} was not published)")
        out = staging / "model"
        for entry in model_files:
            rel = entry["path"][len(part) + 1 :]
            if rel == MANIFEST_NAME:
                raise PullError(f"the model itself holds a {MANIFEST_NAME}; refusing to overwrite it with the manifest")
            target = out / rel
            store.download(stored_key(run, entry), target)
            actual = sha256_file(target)
            if actual != entry["sha256"] or target.stat().st_size != entry["size"]:
                raise PullError(
                    f"{entry['path']} of {name}:{alias} (run {manifest['run_id']}) failed verification: "
                    f"SHA-256 {actual}, {target.stat().st_size} bytes; the manifest records {entry['sha256']}, "
                    f"{entry['size']} bytes. The stored copy is corrupt or was changed after publishing; "
                    f"nothing was written to {dest}"
                )
        (out / MANIFEST_NAME).write_bytes(manifest_bytes)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        out.rename(dest)
        return dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
