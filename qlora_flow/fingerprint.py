"""Content fingerprints: the cache keys of the pipeline.

A fingerprint hashes what determines a result (data bytes, model files, the relevant config
section, the code and library versions), so an unchanged input never recomputes and any
changed byte does.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel

_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "pandera")
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: str | Path, ignore: tuple[str, ...] = ()) -> str:
    """Hash every file under root (relative path + bytes), in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(rel.startswith(prefix) for prefix in ignore):
            continue
        digest.update(rel.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _source_path(module: str) -> Path:
    return _project_root() / (module.replace(".", "/") + ".py")


def code_version(*modules: str) -> str:
    """Hash of the source files that produce a result (all project code when none are named).

    Naming the modules keeps an edit to, say, the evaluation stage from invalidating trained adapters.
    The stages name theirs in qlora_flow.code_lineage, which also lists earlier hashes declared equivalent.
    """
    project_root = _project_root()
    if modules:
        paths = [_source_path(m) for m in modules]
    else:
        paths = [p for package in ("qlora_flow", "tasks") for p in (project_root / package).rglob("*.py")]
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(project_root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def source_digest(*modules: str) -> str:
    """SHA-256 of the modules' source bytes concatenated in the order given (no names, the full digest): the
    validation stage's code hash since its first release, kept so for the data fingerprints stored with it."""
    return hashlib.sha256(b"".join(_source_path(m).read_bytes() for m in modules)).hexdigest()


def combine(*parts: object) -> str:
    """Stable hash of JSON-able parts (pydantic models are dumped first)."""
    normalised = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    blob = json.dumps(normalised, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
