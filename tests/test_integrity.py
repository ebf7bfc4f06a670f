"""Store entries record their files at commit; readers verify, quarantine what fails, and map old URIs."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
from s3server import moto_server, s3env  # noqa: F401  (fixtures)

from qlora_flow.store import LocalStore


def _entry(store: LocalStore, key: str = "cache/adapter/fp/checkpoints/checkpoint-4") -> dict[str, bytes]:
    files = {"adapter_model.safetensors": bytes(range(256)) * 40, "nested/state.json": b'{"step": 4}'}
    out = store.workdir(key)
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    store.commit(key)
    return files


def _quarantined(store: LocalStore) -> list[Path]:
    return sorted(store.path.glob("quarantine/**/reason.json"))


def test_commit_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    store = LocalStore(tmp_path / "s")
    files = _entry(store)
    marker = json.loads((store.path / "cache/adapter/fp/checkpoints/checkpoint-4/_COMPLETE").read_text())
    assert marker == {
        "files": {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in files.items()}
    }
    assert (
        store.verified("cache/adapter/fp/checkpoints/checkpoint-4")
        == store.path / "cache/adapter/fp/checkpoints/checkpoint-4"
    )


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_entry_is_quarantined_with_its_reason(tmp_path, caplog, damage):
    store = LocalStore(tmp_path / "s")
    key = "cache/adapter/fp/checkpoints/checkpoint-4"
    files = _entry(store, key)
    target = store.path / key / "adapter_model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[5000] ^= 0x01
        target.write_bytes(bytes(data))
    else:
        target.unlink()

    with caplog.at_level(logging.WARNING):
        assert store.verified(key) is None
    assert not (store.path / key).exists() and not store.is_complete(key)
    [reason_file] = _quarantined(store)
    assert (
        reason_file.parent.parent.relative_to(store.path).as_posix() == "quarantine/adapter/fp/checkpoints/checkpoint-4"
    )
    reason = json.loads(reason_file.read_text())
    [problem] = reason["problems"]
    assert reason["key"] == key and problem["file"] == "adapter_model.safetensors"
    assert problem["problem"] == {"truncate": "size", "flip": "sha256", "delete": "missing"}[damage]
    # nothing is lost: the entry's files (marker included) are kept next to the reason
    kept = reason_file.parent / "entry"
    assert (kept / "nested/state.json").read_bytes() == files["nested/state.json"] and (kept / "_COMPLETE").is_file()
    assert any(
        r.levelno == logging.WARNING
        and "adapter_model.safetensors" in r.getMessage()
        and "quarantine/" in r.getMessage()
        for r in caplog.records
    )


def test_base_check_rehashes_only_files_changed_since_they_last_verified(tmp_path, monkeypatch):
    from qlora_flow import integrity

    hashed: list[str] = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    store = LocalStore(tmp_path / "s")
    key = "cache/base/src/nf4-q"
    files = _entry(store, key)
    hashed.clear()

    assert store.verified(key, always_hash=False) is not None
    assert sorted(hashed) == sorted(Path(rel).name for rel in files)  # the first check hashes everything
    assert (store.path / key / "_VERIFIED").is_file()
    assert json.loads((store.path / key / "_COMPLETE").read_text())["files"].keys() == files.keys()
    hashed.clear()
    assert store.verified(key, always_hash=False) is not None and hashed == []  # unchanged: stats only

    time.sleep(0.05)  # past the file system's timestamp granularity
    target = store.path / key / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF
    target.write_bytes(bytes(data))  # same size, changed in place
    assert store.verified(key, always_hash=False) is None
    assert hashed == ["adapter_model.safetensors"]
    [reason] = [json.loads(p.read_text()) for p in _quarantined(store)]
    assert reason["problems"][0]["problem"] == "sha256"


def test_legacy_marker_without_file_list_is_trusted_and_noted_once(tmp_path, caplog, monkeypatch):
    from qlora_flow import integrity

    monkeypatch.setattr(integrity, "_legacy_noted", False)
    store = LocalStore(tmp_path / "s")
    for key in ("cache/data/a", "cache/data/b"):
        _entry(store, key)
        (store.path / key / "_COMPLETE").write_text("ok\n")  # what stores written before file lists hold
    with caplog.at_level(logging.INFO, logger="qlora_flow.integrity"):
        assert store.verified("cache/data/a") == store.path / "cache/data/a"
        assert store.verified("cache/data/b") == store.path / "cache/data/b"
    assert sum("without verification" in r.getMessage() for r in caplog.records) == 1
    assert _quarantined(store) == []


def test_key_of_maps_keys_own_uris_and_uris_of_a_copied_store(tmp_path):
    old = LocalStore(tmp_path / "old" / "runs" / "artifacts")  # "runs" in the root path itself must not confuse it
    _entry(old, "cache/data/fp")
    shutil.copytree(old.path, tmp_path / "copy")
    new = LocalStore(tmp_path / "copy")

    assert new.key_of(new.uri("cache/data/fp/train.parquet")) == "cache/data/fp/train.parquet"
    assert new.key_of("cache/data/fp/nested/state.json") == "cache/data/fp/nested/state.json"
    assert new.key_of(old.uri("cache/data/fp/nested/state.json")) == "cache/data/fp/nested/state.json"
    assert new.key_of("s3://bucket/prefix/cache/data/fp/nested/state.json") == "cache/data/fp/nested/state.json"
    with pytest.raises(ValueError, match="not inside the artifact store"):
        new.key_of(str(tmp_path / "elsewhere" / "model"))
    with pytest.raises(ValueError):
        new.key_of(old.uri("cache/data/not-stored-here"))


def test_documents_store_keys_and_read_back_as_uris_of_the_current_store(tmp_path):
    old = LocalStore(tmp_path / "old")
    _entry(old, "cache/data/fp")
    document = {
        "report_uri": old.uri("cache/data/fp/nested/state.json"),
        "quarantine_uri": None,
        "sources": [{"file": "/data/train.jsonl", "uri": "/data/train.jsonl"}],
        "n": 3,
    }
    stored = old.as_keys(document)
    assert stored["report_uri"] == "cache/data/fp/nested/state.json"
    assert stored["sources"] == document["sources"] and stored["n"] == 3
    assert str(tmp_path) not in json.dumps(stored)

    shutil.copytree(old.path, tmp_path / "copy")
    new = LocalStore(tmp_path / "copy")
    for written in (stored, document):  # relative keys, and a legacy absolute URI of the old place
        read = new.as_uris(written)
        assert read["report_uri"] == new.uri("cache/data/fp/nested/state.json")
        assert read["sources"] == document["sources"] and read["quarantine_uri"] is None
    # an entry removed since it was referenced still maps into the current store
    gone = new.as_uris({"checkpoint_uri": old.uri("cache/adapter/fp/checkpoints")})
    assert gone == {"checkpoint_uri": new.uri("cache/adapter/fp/checkpoints")}


def test_s3_local_copy_damage_is_downloaded_again_stored_damage_is_quarantined(s3env, tmp_path, caplog):
    store = s3env.store(tmp_path / "cache")
    key = "cache/adapter/fp/checkpoints/checkpoint-4"
    files = _entry(store, key)
    local = tmp_path / "cache" / key / "adapter_model.safetensors"

    data = bytearray(local.read_bytes())
    data[0] ^= 0x01
    local.write_bytes(bytes(data))  # the working copy is damaged, the stored objects are fine
    assert store.verified(key) == tmp_path / "cache" / key
    assert local.read_bytes() == files["adapter_model.safetensors"]

    s3env.raw.put_object(Bucket=s3env.bucket, Key=f"store/{key}/nested/state.json", Body=b'{"step": 5}')
    fresh = s3env.store(tmp_path / "fresh")
    with caplog.at_level(logging.WARNING):
        assert fresh.verified(key) is None
    assert not store.is_complete(key) and not s3env.objects(f"store/{key}/")
    stored = s3env.objects("store/quarantine/adapter/fp/checkpoints/checkpoint-4/")
    [reason_key] = [k for k in stored if k.endswith("/reason.json")]
    reason = json.loads(stored[reason_key])
    assert reason["key"] == key and [p["file"] for p in reason["problems"]] == ["nested/state.json"]
    entry = reason_key.removesuffix("reason.json") + "entry/"
    assert stored[entry + "nested/state.json"] == b'{"step": 5}'
    assert stored[entry + "adapter_model.safetensors"] == files["adapter_model.safetensors"]
    assert json.loads(stored[entry + "_COMPLETE"])["files"].keys() == files.keys()
    assert _warned_once(caplog, "nested/state.json")


def _warned_once(caplog, word: str) -> bool:
    return sum(r.levelno == logging.WARNING and word in r.getMessage() for r in caplog.records) == 1


def test_entry_rewritten_by_another_writer_during_the_check_is_not_quarantined(tmp_path, monkeypatch):
    from qlora_flow import integrity

    store = LocalStore(tmp_path / "s")
    key = "cache/data/fp"
    _entry(store, key)
    real = integrity.problems

    def rewritten_meanwhile(root, listing, always_hash):
        store.workdir(key)  # a second run rebuilding the same entry drops its marker first...
        (root / "adapter_model.safetensors").write_bytes(b"half")  # ...then writes its files
        return real(root, listing, always_hash)

    monkeypatch.setattr(integrity, "problems", rewritten_meanwhile)
    assert store.verified(key) is None
    assert _quarantined(store) == [] and (store.path / key / "adapter_model.safetensors").read_bytes() == b"half"
