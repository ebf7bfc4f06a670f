"""What a stored directory must contain, and the check a reader makes before trusting it.

A commit writes the `_COMPLETE` marker last, holding the list of every file with its size and
SHA-256: `{"files": {"<relative path>": {"size": N, "sha256": "<hex>"}}}`, the same document on a
local directory and on S3. A reader compares the files with that list (`problems`) and the store
moves an entry that fails aside to `quarantine/` (ArtifactStore.verified) instead of using it.

Markers written before the list was recorded hold `ok`; such entries are read as they are
(nothing to compare against), and the first one a process meets is logged once.

Multi-GB base checkpoints are not re-hashed on every read (`always_hash=False`): the first check
hashes every file and leaves a `_VERIFIED` stamp beside them with each file's size and modification
time; later checks hash again only a file whose size or mtime changed since. So any write through the
file system (a truncation, a byte flipped in place, a copy that did not keep timestamps) is hashed on
the next check; damage below the file system that keeps the mtime (media bit rot) is not.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from qlora_flow import layout
from qlora_flow.fingerprint import sha256_file

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
STAMP_NAME = "_VERIFIED"  # local bookkeeping of a reader, never part of the entry

_legacy_noted = False


class CorruptEntry(RuntimeError):
    """A stored file does not match the size or SHA-256 its directory's marker recorded."""

    def __init__(self, message: str, problems: list[dict]):
        super().__init__(message)
        self.problems = problems


def files_of(root: Path) -> list[Path]:
    """Every file a commit of root stores (all but the marker and the stamp), sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (COMPLETE_MARKER, STAMP_NAME))


def listing_of(root: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file under root, by relative path. Hashes run in threads: hashlib
    releases the GIL on large buffers, so a multi-shard model hashes on several cores."""
    files = files_of(root)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256_file, files))
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)}


def marker_document(listing: dict[str, dict]) -> bytes:
    return json.dumps({"files": listing}, indent=1, sort_keys=True).encode()


def recorded_listing(marker: bytes) -> dict[str, dict] | None:
    """The file list a marker recorded; None for a legacy marker that recorded none."""
    try:
        document = json.loads(marker)
    except ValueError:
        return None
    files = document.get("files") if isinstance(document, dict) else None
    return files if isinstance(files, dict) else None


def note_legacy(where: str) -> None:
    global _legacy_noted
    if not _legacy_noted:
        _legacy_noted = True
        log.info(
            "%s (and possibly other entries) was stored before file sizes and SHA-256 were recorded; "
            "such entries are used without verification until they are rebuilt",
            where,
        )


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def write_stamp(root: Path, listing: dict[str, dict]) -> None:
    """Record the files' stats now that their SHA-256 matched listing (best effort: a read-only store has none)."""
    try:
        (root / STAMP_NAME).write_text(json.dumps({rel: _stat(root / rel) for rel in sorted(listing)}))
    except OSError:
        pass


def _read_stamp(root: Path) -> dict:
    try:
        return json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}


def problems(root: Path, listing: dict[str, dict], always_hash: bool = True) -> list[dict]:
    """How the files under root differ from listing: missing files, sizes, SHA-256. Without always_hash, only
    files whose size or mtime changed since their SHA-256 last matched are hashed (see the module docstring)."""
    stamp = {} if always_hash else _read_stamp(root)
    found, hashed = [], False
    for rel, meta in sorted(listing.items()):
        path = root / rel
        if not path.is_file():
            found.append({"file": rel, "problem": "missing", "expected_size": meta["size"]})
            continue
        stat = _stat(path)
        if stat[0] != meta["size"]:
            found.append({"file": rel, "problem": "size", "expected_size": meta["size"], "found_size": stat[0]})
        elif stamp.get(rel) != stat:
            hashed = True
            if (digest := sha256_file(path)) != meta["sha256"]:
                found.append(
                    {"file": rel, "problem": "sha256", "expected_sha256": meta["sha256"], "found_sha256": digest}
                )
    if not always_hash and hashed and not found:
        write_stamp(root, listing)
    return found


def describe(found: list[dict]) -> str:
    parts = []
    for p in found:
        if p["problem"] == "missing":
            parts.append(f"{p['file']} is missing")
        elif p["problem"] == "size":
            parts.append(f"{p['file']} has {p['found_size']} bytes, {p['expected_size']} recorded")
        else:
            parts.append(
                f"{p['file']} has SHA-256 {p['found_sha256'][:12]}..., {p['expected_sha256'][:12]}... recorded"
            )
    return "; ".join(parts)


def quarantine_key(key: str) -> str:
    """Where a corrupt entry goes: quarantine/<kind>/<rest of its key>/<UTC time>, e.g.
    quarantine/adapter/<fp>/checkpoints/checkpoint-8/20261201T041500.123456Z for cache/adapter/<fp>/..."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return layout.quarantine_key(key, stamp)


def reason_document(key: str, found: list[dict]) -> dict:
    return {
        "key": key,
        "quarantined_at": datetime.now(timezone.utc).isoformat(),
        "reason": describe(found),
        "problems": found,
    }
