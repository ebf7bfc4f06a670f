"""S3Store against a real S3 API (moto's server) with faults injected by a proxy in front of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from s3server import ACCESS_KEY, Fault, moto_server, s3env  # noqa: F401  (fixtures)

from qlora_flow.config import S3Settings
from qlora_flow.fingerprint import sha256_file
from qlora_flow.s3store import make_client
from qlora_flow.store import AliasConflict

MIB = 1 << 20


def _fill(root: Path, big_mib: int = 12) -> dict[str, bytes]:
    files = {
        "weights.bin": os.urandom(big_mib * MIB),  # multipart: 5 MiB parts in the test settings
        "config.json": b'{"a": 1}',
        "nested/dir/tokenizer.json": os.urandom(3000),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _requests(env, method: str, marker: str) -> list:
    return [r for r in env.proxy.log if r[0] == method and marker in r[1]]


def test_commit_uploads_verifies_and_fetch_round_trips(s3env, tmp_path):
    store = s3env.store(tmp_path / "cache")
    files = _fill(store.workdir("runs/r1/model"))

    assert store.commit("runs/r1/model") == f"s3://{s3env.bucket}/store/runs/r1/model"

    stored = s3env.objects("store/runs/r1/model/")
    assert {
        k.removeprefix("store/runs/r1/model/"): v for k, v in stored.items() if not k.endswith("_COMPLETE")
    } == files
    marker = json.loads(stored["store/runs/r1/model/_COMPLETE"])
    assert marker["files"]["weights.bin"]["size"] == 12 * MIB
    assert len(_requests(s3env, "PUT", "partNumber=")) == 3  # 12 MiB in 5 MiB parts
    assert store.is_complete("runs/r1/model")

    fresh = s3env.store(tmp_path / "other-cache")
    local = fresh.fetch("runs/r1/model")
    assert {
        p.relative_to(local).as_posix(): p.read_bytes()
        for p in local.rglob("*")
        if p.name != "_COMPLETE" and p.is_file()
    } == files

    # a second commit of unchanged files re-uploads nothing
    before = len(_requests(s3env, "PUT", ""))
    store.commit("runs/r1/model")
    puts = _requests(s3env, "PUT", "")[before:]
    assert [p[1] for p in puts] == ["/" + s3env.bucket + "/store/runs/r1/model/_COMPLETE"]


def test_recommit_drops_stale_objects_and_unfinished_marker(s3env, tmp_path):
    store = s3env.store(tmp_path / "cache")
    work = store.workdir("cache/adapter/fp1")
    _fill(work, big_mib=1)
    store.commit("cache/adapter/fp1")

    work = store.workdir("cache/adapter/fp1")
    (work / "nested/dir/tokenizer.json").unlink()
    store.commit("cache/adapter/fp1")
    assert store.list("cache/adapter/fp1") == [
        "cache/adapter/fp1/_COMPLETE",
        "cache/adapter/fp1/config.json",
        "cache/adapter/fp1/empty.txt",
        "cache/adapter/fp1/weights.bin",
    ]
    with pytest.raises(FileNotFoundError, match="never completed"):
        store.fetch("cache/adapter/missing")


def test_alias_compare_and_swap_uses_conditional_puts(s3env, tmp_path):
    seen: list[dict] = []
    s3env.proxy.rule = lambda method, path, headers: (
        seen.append(headers) if path.endswith("production.json") and method == "PUT" else None
    )
    store = s3env.store(tmp_path / "cache")
    key = "models/m/production.json"

    assert store.read_alias(key) == (None, None)
    store.swap_alias(key, {"run_id": "a"}, None)
    with pytest.raises(AliasConflict):
        store.swap_alias(key, {"run_id": "b"}, None)
    doc, version = store.read_alias(key)
    assert doc == {"run_id": "a"}
    store.swap_alias(key, {"run_id": "c"}, version)
    with pytest.raises(AliasConflict):
        store.swap_alias(key, {"run_id": "d"}, version)  # stale version

    assert store.read_alias(key)[0] == {"run_id": "c"}
    conditions = [(h.get("If-None-Match"), h.get("If-Match")) for h in seen]
    assert conditions == [("*", None), ("*", None), (None, version), (None, version)]
    assert [status for method, path, status in s3env.proxy.log if method == "PUT"] == [200, 412, 200, 412]


def test_alias_fallback_for_servers_without_conditional_writes(s3env, tmp_path, caplog):
    def no_conditions(method, path, headers):
        if method == "PUT" and ("If-Match" in headers or "If-None-Match" in headers):
            return Fault(501, "NotImplemented")
        return None

    s3env.proxy.rule = no_conditions
    store = s3env.store(tmp_path / "cache")
    key = "models/m/production.json"
    store.swap_alias(key, {"run_id": "a"}, None)
    doc, version = store.read_alias(key)
    assert doc == {"run_id": "a"}
    with pytest.raises(AliasConflict, match="changed since it was read"):
        store.swap_alias(key, {"run_id": "b"}, None)
    store.swap_alias(key, {"run_id": "c"}, version)
    assert store.read_alias(key)[0] == {"run_id": "c"}
    assert "does not support conditional writes" in caplog.text


def test_transient_500_503_and_slowdown_are_retried(s3env, tmp_path):
    counts: dict[str, int] = {}

    def flaky(method, path, headers):
        # the first attempt of every request fails, alternating the error kind
        n = counts[method + path] = counts.get(method + path, 0) + 1
        if n == 1 and method in ("PUT", "POST", "HEAD"):
            return [Fault(500, "InternalError"), Fault(503, "SlowDown"), Fault(503, "ServiceUnavailable")][
                len(counts) % 3
            ]
        return None

    s3env.proxy.rule = flaky
    store = s3env.store(tmp_path / "cache")
    files = _fill(store.workdir("runs/r/model"))
    store.commit("runs/r/model")

    injected = [status for _, _, status in s3env.proxy.log if status in (500, 503)]
    assert len(injected) >= 6
    stored = s3env.objects("store/runs/r/model/")
    assert stored["store/runs/r/model/weights.bin"] == files["weights.bin"]
    assert json.loads(stored["store/runs/r/model/_COMPLETE"])["files"].keys() == files.keys()


def test_connection_dropped_mid_part_is_retried(s3env, tmp_path):
    dropped = []

    def cut_first_two_parts(method, path, headers):
        if "partNumber=" in path and len(dropped) < 2:
            dropped.append(path)
            return Fault(drop=True)
        return None

    s3env.proxy.rule = cut_first_two_parts
    store = s3env.store(tmp_path / "cache")
    files = _fill(store.workdir("runs/r/model"))
    store.commit("runs/r/model")

    assert len([r for r in s3env.proxy.log if r[2] == -1]) == 2
    assert s3env.objects("store/runs/r/model/weights.bin")["store/runs/r/model/weights.bin"] == files["weights.bin"]
    assert s3env.raw.list_multipart_uploads(Bucket=s3env.bucket).get("Uploads", []) == []


def test_persistent_errors_fail_cleanly_without_marker(s3env, tmp_path):
    s3env.proxy.rule = lambda method, path, headers: Fault(503, "SlowDown") if "partNumber=" in path else None
    store = s3env.store(tmp_path / "cache", max_attempts=2)
    _fill(store.workdir("runs/r/model"))
    with pytest.raises(ClientError, match="SlowDown"):
        store.commit("runs/r/model")

    keys = set(s3env.objects("store/runs/r/model/"))
    assert "store/runs/r/model/_COMPLETE" not in keys
    assert "store/runs/r/model/weights.bin" not in keys
    assert not store.is_complete("runs/r/model")
    # s3transfer aborted its multipart upload on the way out
    assert s3env.raw.list_multipart_uploads(Bucket=s3env.bucket).get("Uploads", []) == []


def test_corrupted_object_fails_fetch_with_file_name(s3env, tmp_path):
    store = s3env.store(tmp_path / "cache")
    _fill(store.workdir("runs/r/model"), big_mib=1)
    store.commit("runs/r/model")
    key = "store/runs/r/model/config.json"
    s3env.raw.put_object(Bucket=s3env.bucket, Key=key, Body=b'{"a": 2}')

    with pytest.raises(RuntimeError, match="config.json: SHA-256"):
        s3env.store(tmp_path / "fresh").fetch("runs/r/model")
    assert not (tmp_path / "fresh/runs/r/model/config.json").exists()


def test_client_settings_reach_botocore(tmp_path, monkeypatch):
    config_file = tmp_path / "aws-config"
    config_file.write_text(
        "[profile qf]\nregion = eu-west-3\naws_access_key_id = AKIAPROFILE\naws_secret_access_key = profile-secret\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)

    client = make_client(
        S3Settings(
            endpoint_url="http://127.0.0.1:9",
            profile="qf",
            addressing_style="path",
            checksum_mode="when_required",
            max_attempts=7,
        )
    )
    cfg = client.meta.config
    assert client.meta.region_name == "eu-west-3"
    assert cfg.s3 == {"addressing_style": "path"}
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    assert cfg.retries == {"mode": "standard", "total_max_attempts": 7}
    assert client._request_signer._credentials.access_key == "AKIAPROFILE"
    assert client.meta.endpoint_url == "http://127.0.0.1:9"


def test_when_required_checksum_mode_verifies_by_etag(s3env, tmp_path):
    store = s3env.store(tmp_path / "cache", checksum_mode="when_required")
    files = _fill(store.workdir("runs/r/model"))
    store.commit("runs/r/model")
    head = s3env.raw.head_object(Bucket=s3env.bucket, Key="store/runs/r/model/weights.bin", ChecksumMode="ENABLED")
    assert "ChecksumSHA256" not in head
    assert head["ETag"].strip('"').endswith("-3")
    local = s3env.store(tmp_path / "fresh").fetch("runs/r/model")
    assert sha256_file(local / "weights.bin") == sha256_file(tmp_path / "cache/runs/r/model/weights.bin")
    assert (local / "config.json").read_bytes() == files["config.json"]
    assert ACCESS_KEY not in json.dumps(store.settings.model_dump())
