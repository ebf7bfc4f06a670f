"""What a stored directory must contain, and the check a reader makes before trusting it.

A commit writes the `_COMPLETE` marker last, holding the list of every file with its size and
SHA-256: `{"files": {"<relative path>": {"size": N, "sha256": "<hex>"}}}`, the same document on a
local directory and on S3. A reader compares the files with that list (`problems`) and the store
moves an entry that fails aside to `quarantine/` (ArtifactStore.verified) instead of using it.

Markers written before the list was recorded hold `ok`; such entries are read as they are
(nothing to compare against), and the first one a process meets is logged once.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from qlora_flow.fingerprint import sha256_file

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
QUARANTINE_ROOT = "quarantine"
REASON_NAME = "reason.json"

_legacy_noted = False


class CorruptEntry(RuntimeError):
    """A stored file does not match the size or SHA-256 its directory's marker recorded."""

    def __init__(self, message: str, problems: list[dict]):
        super().__init__(message)
        self.problems = problems


def files_of(root: Path) -> list[Path]:
    """Every file a commit of root stores (all but the marker itself), sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)


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
            "such entries are used without verification until they are rebuilt", where,
        )


def problems(root: Path, listing: dict[str, dict], hashes: bool) -> list[dict]:
    """How the files under root differ from listing: missing files, sizes, and (when hashes) SHA-256."""
    found = []
    for rel, meta in sorted(listing.items()):
        path = root / rel
        if not path.is_file():
            found.append({"file": rel, "problem": "missing", "expected_size": meta["size"]})
            continue
        size = path.stat().st_size
        if size != meta["size"]:
            found.append({"file": rel, "problem": "size", "expected_size": meta["size"], "found_size": size})
        elif hashes and (digest := sha256_file(path)) != meta["sha256"]:
            found.append({"file": rel, "problem": "sha256", "expected_sha256": meta["sha256"], "found_sha256": digest})
    return found


def describe(found: list[dict]) -> str:
    parts = []
    for p in found:
        if p["problem"] == "missing":
            parts.append(f"{p['file']} is missing")
        elif p["problem"] == "size":
            parts.append(f"{p['file']} has {p['found_size']} bytes, {p['expected_size']} recorded")
        else:
            parts.append(f"{p['file']} has SHA-256 {p['found_sha256'][:12]}..., {p['expected_sha256'][:12]}... recorded")
    return "; ".join(parts)


def quarantine_key(key: str) -> str:
    """Where a corrupt entry goes: quarantine/<kind>/<rest of its key>/<UTC time>, e.g.
    quarantine/adapter/<fp>/checkpoints/checkpoint-8/20261201T041500.123456Z for cache/adapter/<fp>/..."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{QUARANTINE_ROOT}/{key.strip('/').removeprefix('cache/')}/{stamp}"


def reason_document(key: str, found: list[dict]) -> dict:
    return {
        "key": key,
        "quarantined_at": datetime.now(timezone.utc).isoformat(),
        "reason": describe(found),
        "problems": found,
    }
