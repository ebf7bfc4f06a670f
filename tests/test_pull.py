"""pull_model: publish -> pull round trip on S3, and refusal of anything that does not verify."""

from __future__ import annotations

import json

import pytest
from s3server import moto_server, s3env, stage_run  # noqa: F401  (fixtures)

from qlora_flow.config import load_config
from qlora_flow.pull import PullError, pull_and_verify, pull_model
from tasks.publish import publish_run


@pytest.fixture
def published(s3env, chat_jsonl, tmp_path):
    cfg = load_config(None, {"data.train_path": str(chat_jsonl), "publish.model_name": "extractor"})
    store = s3env.store(tmp_path / "cache")
    run = stage_run(store, "run-1", model_mib=6)  # 6 MiB: downloaded in parts too
    publish_run(cfg, store, "run-1", **run.refs)
    return run


def _pull(s3env, dest, alias="production"):
    return pull_model(f"s3://{s3env.bucket}/store", "extractor", alias, dest, s3=s3env.settings())


def test_round_trip_is_byte_identical(s3env, published, tmp_path):
    dest = _pull(s3env, tmp_path / "models/extractor")

    assert dest == (tmp_path / "models/extractor").resolve()
    files = {p.name: p.read_bytes() for p in dest.iterdir()}
    manifest = json.loads(files.pop("manifest.json"))
    assert files == published.model_files
    assert manifest["run_id"] == "run-1"
    assert [p.name for p in dest.parent.iterdir()] == ["extractor"]  # no staging leftovers
    # pulling again into the same place checks every file and changes nothing; latest resolves to the same run
    again = pull_and_verify(f"s3://{s3env.bucket}/store", "extractor", "production", dest, s3=s3env.settings())
    assert (again.checked, again.downloaded, again.extra) == (4, [], [])
    assert again.summary() == "4 files checked, all match the manifest"
    assert (
        _pull(s3env, tmp_path / "latest", alias="latest").joinpath("config.json").read_bytes() == files["config.json"]
    )


def test_flipped_byte_in_storage_is_refused_and_nothing_exposed(s3env, published, tmp_path):
    key = "store/runs/run-1/model/model.safetensors"
    data = bytearray(s3env.raw.get_object(Bucket=s3env.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    s3env.raw.put_object(Bucket=s3env.bucket, Key=key, Body=bytes(data))

    dest = tmp_path / "models/extractor"
    with pytest.raises(
        PullError, match=r"model/model\.safetensors of extractor:production \(run run-1\) failed verification"
    ):
        _pull(s3env, dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_tampered_manifest_is_refused(s3env, published, tmp_path):
    key = "store/runs/run-1/manifest.json"
    manifest = json.loads(s3env.raw.get_object(Bucket=s3env.bucket, Key=key)["Body"].read())
    manifest["files"][0]["sha256"] = "0" * 64
    s3env.raw.put_object(Bucket=s3env.bucket, Key=key, Body=json.dumps(manifest).encode())
    with pytest.raises(PullError, match="does not match the checksum recorded"):
        _pull(s3env, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_missing_alias_and_occupied_destination(s3env, published, tmp_path):
    with pytest.raises(PullError, match="nothing is published as extractor:staging"):
        _pull(s3env, tmp_path / "m", alias="staging")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(PullError, match="already exists"):
        _pull(s3env, occupied)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    with pytest.raises(PullError, match="is a file; choose a directory"):
        _pull(s3env, occupied / "notes.txt")


def test_pull_over_a_changed_destination_restores_it(s3env, published, tmp_path):
    """The destination is never trusted: a changed, a missing and a truncated file are downloaded again."""
    dest = _pull(s3env, tmp_path / "served")
    (dest / "config.json").write_text('{"hidden_size": 4096}')
    (dest / "tokenizer.json").unlink()
    with open(dest / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    (dest / "notes.txt").write_text("mine")

    report = pull_and_verify(f"s3://{s3env.bucket}/store", "extractor", "production", dest, s3=s3env.settings())

    assert report.checked == 4
    assert sorted(report.downloaded) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert report.extra == ["notes.txt"]
    assert report.summary() == "4 files checked, 3 restored: config.json, model.safetensors, tokenizer.json"
    files = {p.name: p.read_bytes() for p in dest.iterdir() if p.name not in ("manifest.json", "notes.txt")}
    assert files == published.model_files
    assert (dest / "notes.txt").read_text() == "mine"  # not ours: left alone, with a warning
    assert not [p.name for p in dest.iterdir() if ".pull-" in p.name]  # no temporary files left


def test_pull_restores_a_damaged_manifest_and_refuses_another_run(s3env, published, tmp_path):
    dest = _pull(s3env, tmp_path / "served")
    manifest = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps({**manifest, "files": []}))
    report = pull_and_verify(f"s3://{s3env.bucket}/store", "extractor", "production", dest, s3=s3env.settings())
    assert report.downloaded == ["manifest.json"]
    assert json.loads((dest / "manifest.json").read_text()) == manifest

    (dest / "manifest.json").write_text(json.dumps({**manifest, "run_id": "run-0"}))
    with pytest.raises(PullError, match="holds something else than run run-1"):
        _pull(s3env, dest)


def test_cli_pull_reports_what_it_checked_and_restored(chat_jsonl, tmp_path):
    """Through `qlora-flow pull` on a local store: a changed file in DEST is restored, and the output says so."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from qlora_flow.store import LocalStore

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(None, {"data.train_path": str(chat_jsonl), "publish.model_name": "extractor"})
    store = LocalStore(tmp_path / "store")
    run = stage_run(store, "run-1")
    publish_run(cfg, store, "run-1", **run.refs)

    def pull() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "qlora_flow.cli", "pull", "extractor", "served", "--store", str(tmp_path / "store")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])},
        )

    first = pull()
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "ok: extractor:production -> served (4 files downloaded and verified)"
    (tmp_path / "served/config.json").write_text('{"hidden_size": 1}')

    second = pull()
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "ok: extractor:production -> served (4 files checked, 1 restored: config.json)"
    assert (tmp_path / "served/config.json").read_bytes() == run.model_files["config.json"]
    assert "served/config.json differs from the manifest" in second.stderr  # logged as a WARNING

    third = pull()
    assert third.stdout.strip() == "ok: extractor:production -> served (4 files checked, all match the manifest)"


def test_stored_and_pulled_files_are_readable_by_others_under_the_usual_umask(s3env, chat_jsonl, tmp_path):
    """A serving process often runs as another user: files must get 0666/0777 less the umask (0644/0755 under
    022), not the 0600/0700 of Python's temporary files, which a write-then-rename would keep."""
    import os
    import stat

    from qlora_flow.store import LocalStore

    def modes(root):
        return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}

    previous = os.umask(0o022)
    try:
        cfg = load_config(None, {"data.train_path": str(chat_jsonl), "publish.model_name": "extractor"})
        local = LocalStore(tmp_path / "store")
        publish_run(cfg, local, "run-1", **stage_run(local, "run-1").refs)
        s3 = s3env.store(tmp_path / "cache")
        publish_run(cfg, s3, "run-1", **stage_run(s3, "run-1").refs)
        pulled_local = pull_model(str(tmp_path / "store"), "extractor", "production", tmp_path / "served-local")
        pulled_s3 = _pull(s3env, tmp_path / "served-s3")
    finally:
        os.umask(previous)

    for root in (tmp_path / "store", pulled_local, pulled_s3):
        found = modes(root)
        assert "manifest.json" in found or any(k.endswith("manifest.json") for k in found)
        wrong = {rel: oct(mode) for rel, mode in found.items() if mode not in (0o644, 0o755)}
        assert wrong == {}, f"{root}: {wrong}"
