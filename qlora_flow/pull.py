"""Consumer side: download the model an alias points to, verified against its manifest.

Into a new destination, files land in a hidden temporary directory next to dest that is renamed
into place only after every SHA-256 matched, so dest either holds a complete, verified model or
does not exist. A destination that already holds the same run is never trusted: every file is
hashed against the manifest, and each one that is missing or differs is downloaded again
(temporary file, verified, renamed over the old one). Files the manifest does not list are left
alone with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from qlora_flow import layout
from qlora_flow.atomic_files import temp_beside, temp_dir_beside
from qlora_flow.config import S3Settings
from qlora_flow.errors import PermanentError
from qlora_flow.fingerprint import sha256_file
from qlora_flow.layout import MANIFEST_NAME
from qlora_flow.store import ArtifactStore, open_store_at

log = logging.getLogger(__name__)

# what `pull` can fetch: a part of the run's manifest (its top-level directory)
PARTS = {"model": "the merged model", "adapter": "the LoRA adapter", "gguf": "the GGUF files"}
_TEMP_MARK = ".pull-"  # in the names of our temporary files: `.<name>.pull-<random>`


class PullError(PermanentError, RuntimeError):
    """The model cannot be pulled, or what was downloaded does not verify."""


@dataclass
class PullReport:
    dest: Path
    checked: int  # files already in dest that were hashed against the manifest
    downloaded: list[str]  # files downloaded (all of them into a new dest, the restored ones otherwise)
    extra: list[str] = field(default_factory=list)  # files in dest that the manifest does not list

    def summary(self) -> str:
        if not self.checked:
            return f"{len(self.downloaded)} files downloaded and verified"
        if not self.downloaded:
            return f"{self.checked} files checked, all match the manifest"
        names = ", ".join(self.downloaded[:5]) + (", ..." if len(self.downloaded) > 5 else "")
        return f"{self.checked} files checked, {len(self.downloaded)} restored: {names}"


def _model_files(manifest: dict, part: str) -> dict[str, dict]:
    """Path inside the part's directory -> manifest entry; refuses paths that would leave it."""
    files = {}
    for entry in manifest["files"]:
        if not entry["path"].startswith(part + "/"):
            continue
        rel = entry["path"][len(part) + 1 :]
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or ".." in parts:
            raise PullError(f"manifest of run {manifest['run_id']} lists an unsafe path {entry['path']!r}")
        if rel == MANIFEST_NAME:
            raise PullError(f"the model itself holds a {MANIFEST_NAME}; refusing to overwrite it with the manifest")
        files[rel] = entry
    if not files:
        raise PullError(f"manifest of run {manifest['run_id']} lists no {part} files ({PARTS[part]} was not published)")
    return files


def _holds_run(dest: Path, run_id: str) -> bool:
    """dest was pulled from run_id before (its manifest may since have been damaged, not replaced)."""
    try:
        return json.loads((dest / MANIFEST_NAME).read_bytes())["run_id"] == run_id
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _matches(path: Path, entry: dict) -> bool:
    return (
        path.is_file()
        and not path.is_symlink()
        and path.stat().st_size == entry["size"]
        and sha256_file(path) == entry["sha256"]
    )


def _download_verified(store: ArtifactStore, key: str, target: Path, entry: dict, label: str, outcome: str) -> None:
    """Download key to a temporary file beside target, check it against entry, then rename it over target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(target, _TEMP_MARK)
    os.close(fd)
    try:
        store.download(key, Path(tmp))
        actual, size = sha256_file(tmp), Path(tmp).stat().st_size
        if actual != entry["sha256"] or size != entry["size"]:
            raise PullError(
                f"{entry['path']} of {label} failed verification: SHA-256 {actual}, {size} bytes; the "
                f"manifest records {entry['sha256']}, {entry['size']} bytes. The stored copy is corrupt or was changed "
                f"after publishing; {outcome}"
            )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _repair(
    store: ArtifactStore, run: str, model_files: dict[str, dict], manifest_bytes: bytes, dest: Path, label: str
) -> PullReport:
    for leftover in dest.rglob(f".*{_TEMP_MARK}*"):  # from a pull that was killed mid-download
        leftover.unlink(missing_ok=True)
    restored = []
    for rel, entry in model_files.items():
        target = dest / rel
        if not _matches(target, entry):
            log.warning("%s differs from the manifest or is missing; downloading it again", target)
            _download_verified(store, stored_key(run, entry), target, entry, label, f"{target} was left as it was")
            restored.append(rel)
    if (dest / MANIFEST_NAME).read_bytes() != manifest_bytes:
        restored.append(MANIFEST_NAME)
        fd, tmp = temp_beside(dest / MANIFEST_NAME, _TEMP_MARK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(manifest_bytes)
        os.replace(tmp, dest / MANIFEST_NAME)
    listed = set(model_files) | {MANIFEST_NAME}
    extra = sorted(
        rel for rel in (p.relative_to(dest).as_posix() for p in dest.rglob("*") if not p.is_dir()) if rel not in listed
    )
    if extra:
        shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
        log.warning(
            "%s holds %d file(s) that the manifest does not list, left as they are: %s", dest, len(extra), shown
        )
    return PullReport(dest, checked=len(model_files), downloaded=restored, extra=extra)


def stored_key(run: str, entry: dict) -> str:
    """Store key of a manifest entry's bytes: under the run's own directory, or at `stored_at` for a merged
    model that an earlier run stored and this run reuses (tasks/publish.py)."""
    return entry.get("stored_at") or f"{run}/{entry['path']}"


def _open(store_uri: str, s3: S3Settings | None, cache_dir: Path) -> ArtifactStore:
    # a pull reads: a mistyped local store must not be created empty and then reported as missing a model
    if not store_uri.startswith("s3://") and not Path(store_uri).is_dir():
        raise PullError(f"artifact store {store_uri} does not exist")
    return open_store_at(store_uri, s3, cache_dir)


def pull_model(
    store_uri: str, name: str, alias: str, dest: Path, s3: S3Settings | None = None, part: str = "model"
) -> Path:
    """Download one part of name:alias (model, adapter or gguf files) into dest, or restore a dest that
    holds it (see pull_and_verify); returns dest."""
    return pull_and_verify(store_uri, name, alias, dest, s3, part).dest


def pull_and_verify(
    store_uri: str, name: str, alias: str, dest: Path, s3: S3Settings | None = None, part: str = "model"
) -> PullReport:
    """Download one part of name:alias (model, adapter or gguf files) plus manifest.json into dest, or bring
    a dest that already holds it back to what the manifest lists; the report says what was checked and
    downloaded."""
    dest = Path(dest).expanduser().resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir_beside(dest)
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
            raise PullError(
                f"{name}:{alias} names run {pointer['run_id']} but its manifest is for run {manifest['run_id']}"
            )

        run = manifest_key.rsplit("/", 1)[0]
        label = f"{name}:{alias} (run {manifest['run_id']})"
        model_files = _model_files(manifest, part)
        if dest.exists() and not dest.is_dir():
            raise PullError(f"{dest} is a file; choose a directory to pull into")
        if dest.exists() and any(dest.iterdir()):
            if not _holds_run(dest, manifest["run_id"]):
                raise PullError(
                    f"{dest} already exists and holds something else than run {manifest['run_id']} of {name}:{alias}; "
                    "choose an empty destination"
                )
            return _repair(store, run, model_files, manifest_bytes, dest, label)

        out = staging / "model"
        for rel, entry in model_files.items():
            _download_verified(store, stored_key(run, entry), out / rel, entry, label, f"nothing was written to {dest}")
        (out / MANIFEST_NAME).write_bytes(manifest_bytes)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        out.rename(dest)
        return PullReport(dest, checked=0, downloaded=sorted(model_files))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
