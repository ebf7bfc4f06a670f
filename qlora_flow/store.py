"""The artifact store: one layout for a local directory and for S3/MinIO.

Layout (same keys on every backend):
    cache/<kind>/<fingerprint>/...   reusable intermediates (validated data, bases, adapters)
    runs/<run-id>/...                one run's outputs and its manifest.json
    models/<name>/<alias>.json       aliases such as `production`, moved last
    quarantine/<kind>/<...>/<time>/  entries that failed verification: entry/ plus reason.json

Stages compute on local files. `workdir(key)` gives the local directory to write a result into,
`commit(key)` makes it visible in the store (local: writes the marker; S3: uploads, then the marker),
and `fetch(key)` returns a local directory holding a stored result (downloading if remote).
A result counts as present only once its `_COMPLETE` marker exists, so a crash mid-write
never leaves something that looks finished. The marker lists every file with size and SHA-256
(qlora_flow.integrity); `verified(key)` checks an entry against it before a stage trusts it, and
moves a corrupt one to quarantine/ so the stage rebuilds or resumes from an older checkpoint.

Documents in the store name other entries by key, relative to the root (`as_keys`), so a store
copied or moved with `cp -a`, `aws s3 sync` or `mc mirror` keeps working; `key_of` also maps the
absolute URIs that older stores hold to keys of the store where they now are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

from qlora_flow import integrity, layout
from qlora_flow.atomic_files import temp_beside
from qlora_flow.integrity import COMPLETE_MARKER

log = logging.getLogger(__name__)

# The top-level folders of every store: a path segment that starts a key.
_TOP_LEVEL = ("cache", "runs", "models", layout.QUARANTINE_ROOT)
_relocation_noted = False


def _key_shaped_tails(segments: list[str]) -> list[str]:
    """Every tail of a path that starts at a top-level store folder, longest first."""
    return ["/".join(segments[i:]) for i, segment in enumerate(segments) if segment in _TOP_LEVEL]


def _is_reference_field(name: object) -> bool:
    return isinstance(name, str) and (name == "uri" or name.endswith("_uri"))


class AliasConflict(RuntimeError):
    """Another writer moved the alias between our read and our write."""


class ArtifactStore(ABC):
    root: str

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under prefix (recursive), relative to the store root."""

    @abstractmethod
    def workdir(self, key: str) -> Path:
        """Local directory where a stage writes the result that will live at key."""

    @abstractmethod
    def commit(self, key: str) -> str:
        """Make workdir(key) visible in the store; write the completion marker last. Returns the URI."""

    @abstractmethod
    def fetch(self, key: str) -> Path:
        """Local directory with the complete result stored at key."""

    @abstractmethod
    def read_alias(self, key: str) -> tuple[dict | None, str | None]:
        """The alias document and a version token for compare-and-swap (None, None when absent)."""

    @abstractmethod
    def swap_alias(self, key: str, document: dict, expected_version: str | None) -> None:
        """Write the alias only if it is still at expected_version (None: only if absent); else AliasConflict."""

    @abstractmethod
    def quarantine(self, key: str, problems: list[dict]) -> str:
        """Move the entry at key to quarantine/ with a reason.json naming each bad file; returns where."""

    def key_of(self, uri: str) -> str:
        """The store key a reference names: a key as it is, a URI of this store, or a URI of the place the
        store was copied or moved from (older stores recorded absolute URIs) whose tail is a key stored here."""
        prefix = self.uri("").rstrip("/") + "/"
        if uri.startswith(prefix):
            return uri[len(prefix) :].strip("/")
        segments = [s for s in uri.split("://", 1)[-1].split("/") if s]
        if "://" not in uri and not uri.startswith("/") and segments and segments[0] in _TOP_LEVEL:
            return "/".join(segments)
        for key in _key_shaped_tails(segments):
            if self.exists(key):
                global _relocation_noted
                if not _relocation_noted:
                    _relocation_noted = True
                    log.info("%s is read as %s: the store was copied or moved from elsewhere", uri, self.uri(key))
                return key
        raise ValueError(f"{uri} is not inside the artifact store {self.root}")

    def as_keys(self, document):
        """document with every reference into this store (fields `uri` / `*_uri`) written as a key, for storing."""
        if isinstance(document, dict):
            prefix = self.uri("").rstrip("/") + "/"
            return {
                k: v[len(prefix) :]
                if _is_reference_field(k) and isinstance(v, str) and v.startswith(prefix)
                else self.as_keys(v)
                for k, v in document.items()
            }
        if isinstance(document, list):
            return [self.as_keys(v) for v in document]
        return document

    def as_uris(self, document):
        """Inverse of as_keys for a document read from the store (legacy absolute URIs are mapped too)."""
        if isinstance(document, dict):
            return {
                k: self._uri_of_reference(v) if _is_reference_field(k) else self.as_uris(v) for k, v in document.items()
            }
        if isinstance(document, list):
            return [self.as_uris(v) for v in document]
        return document

    def _uri_of_reference(self, value):
        if not isinstance(value, str):
            return value
        try:
            return self.uri(self.key_of(value))
        except ValueError:
            # a reference field names an entry of the store it was written in, even one removed since
            # (checkpoints deleted to save space): its innermost key-shaped tail, else the value as written
            tails = _key_shaped_tails([s for s in value.split("://", 1)[-1].split("/") if s])
            return self.uri(tails[-1]) if tails else value

    def verified(self, key: str, *, always_hash: bool = True) -> Path | None:
        """Local directory of the complete entry at key after checking every file against the size and SHA-256
        its marker recorded (always_hash=False: SHA-256 only of files changed since they last matched, see
        qlora_flow.integrity). None when the entry is absent, unfinished or corrupt; a corrupt entry is
        moved to quarantine/ first (WARNING), so the caller rebuilds it."""
        if not self.is_complete(key):
            return None
        marker_key = f"{key}/{COMPLETE_MARKER}"
        for attempt in range(2):
            try:
                path = self.fetch(key)
                marker = self.read_bytes(marker_key)
            except integrity.CorruptEntry as exc:
                found, marker = exc.problems, None
                break
            except FileNotFoundError:  # removed since is_complete (another writer re-committing it)
                return None
            listing = integrity.recorded_listing(marker)
            if listing is None:
                integrity.note_legacy(self.uri(key))
                return path
            found = integrity.problems(path, listing, always_hash)
            if not found:
                return path
            if not (attempt == 0 and self._drop_local_copy(key)):
                break
        try:
            if marker is not None and self.read_bytes(marker_key) != marker:
                return None  # another writer is rebuilding it right now: not ours to move
            where = self.quarantine(key, found)
        except FileNotFoundError:  # another writer or reader (a DDP rank) got there first
            return None
        log.warning("%s is corrupt (%s); moved it to %s", self.uri(key), integrity.describe(found), self.uri(where))
        return None

    def _drop_local_copy(self, key: str) -> bool:
        """Forget a local working copy of a remote entry, so the next fetch downloads it again; False when
        the local files are the store itself."""
        return False

    def fetch_file(self, uri: str) -> Path:
        """Local path of a file inside a committed store directory (fetching the directory if remote)."""
        parent, _, name = self.key_of(uri).rpartition("/")
        return self.fetch(parent) / name

    def is_complete(self, key: str) -> bool:
        return self.exists(f"{key}/{COMPLETE_MARKER}")

    def read_json(self, key: str) -> dict:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, document: dict) -> None:
        self.write_bytes(key, json.dumps(document, indent=2, sort_keys=True).encode())

    def file_info(self, key: str) -> tuple[int, str]:
        """Size and hex SHA-256 of one stored object."""
        import hashlib

        data = self.read_bytes(key)
        return len(data), hashlib.sha256(data).hexdigest()

    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy one object inside the store."""
        self.write_bytes(dst_key, self.read_bytes(src_key))

    def download(self, key: str, path: Path) -> None:
        """Write one stored object to a local file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.read_bytes(key))


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.path = Path(root).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.root = str(self.path)

    def _p(self, key: str) -> Path:
        return self.path / key

    def uri(self, key: str) -> str:
        return str(self._p(key))

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def read_bytes(self, key: str) -> bytes:
        return self._p(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self._p(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: readers see the old file or the new one, never half of one
        fd, tmp = temp_beside(target)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)

    def list(self, prefix: str) -> list[str]:
        base = self._p(prefix)
        if base.is_file():
            return [prefix]
        if not base.exists():
            return []
        return sorted(p.relative_to(self.path).as_posix() for p in base.rglob("*") if p.is_file())

    def workdir(self, key: str) -> Path:
        path = self._p(key)
        marker = path / COMPLETE_MARKER
        if marker.exists():
            marker.unlink()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, key: str) -> str:
        self.write_bytes(f"{key}/{COMPLETE_MARKER}", integrity.marker_document(integrity.listing_of(self._p(key))))
        return self.uri(key)

    def quarantine(self, key: str, problems: list[dict]) -> str:
        # one rename within the store: the entry stops being visible at once and nothing is lost
        where = integrity.quarantine_key(key)
        self._p(where).mkdir(parents=True)
        try:
            os.rename(self._p(key), self._p(f"{where}/entry"))
        except FileNotFoundError:
            self._p(where).rmdir()
            raise
        self.write_json(f"{where}/{layout.REASON_NAME}", integrity.reason_document(key, problems))
        return where

    def fetch(self, key: str) -> Path:
        if not self.is_complete(key):
            raise FileNotFoundError(f"{self.uri(key)} is missing or was never completed")
        return self._p(key)

    def file_info(self, key: str) -> tuple[int, str]:
        from qlora_flow.fingerprint import sha256_file

        path = self._p(key)
        return path.stat().st_size, sha256_file(path)

    def copy(self, src_key: str, dst_key: str) -> None:
        target = self._p(dst_key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(target)
        os.close(fd)
        shutil.copyfile(self._p(src_key), tmp)
        os.replace(tmp, target)

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._p(key), path)

    def read_alias(self, key: str) -> tuple[dict | None, str | None]:
        path = self._p(key)
        if not path.exists():
            return None, None
        data = path.read_bytes()
        import hashlib

        return json.loads(data), hashlib.sha256(data).hexdigest()

    def swap_alias(self, key: str, document: dict, expected_version: str | None) -> None:
        import fcntl
        import hashlib

        path = self._p(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
            if current != expected_version:
                raise AliasConflict(
                    f"{self.uri(key)} changed since it was read (expected {expected_version}, found {current})"
                )
            self.write_json(key, document)


def open_store(execution) -> ArtifactStore:
    """The store named by an ExecutionConfig: a local directory, or s3://bucket/prefix."""
    return open_store_at(execution.store, execution.s3, execution.local_cache)


def open_store_at(store_uri: str, s3, cache_dir) -> ArtifactStore:
    """The store at a URI (what `qlora-flow pull --store` names); s3 is the S3Settings for an s3:// URI."""
    if store_uri.startswith("s3://"):
        from qlora_flow.config import S3Settings
        from qlora_flow.s3store import S3Store

        return S3Store.from_config(store_uri, s3 or S3Settings(), cache_dir=cache_dir)
    return LocalStore(store_uri)
