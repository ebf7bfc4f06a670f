"""publish_run on S3 (moto server behind a fault proxy) and on a local store."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
from s3server import Fault, moto_server, s3env, stage_run  # noqa: F401  (fixtures)

from qlora_flow.config import load_config
from qlora_flow.pull import pull_model
from qlora_flow.stage_cache import recipe_fingerprint
from qlora_flow.store import LocalStore
from tasks.publish import PublishError, publish_run, redact


@pytest.fixture
def s3_cfg(s3env, chat_jsonl, tmp_path):
    def make(**overrides):
        return load_config(
            None,
            {
                "data.train_path": str(chat_jsonl),
                "execution.store": f"s3://{s3env.bucket}/store",
                "execution.local_cache": str(tmp_path / "cache"),
                "execution.s3": s3env.settings().model_dump(),
                "publish.model_name": "extractor",
                **overrides,
            },
        )

    return make


def _alias(env, name="production"):
    objects = env.objects(f"store/models/extractor/{name}.json")
    return json.loads(objects[f"store/models/extractor/{name}.json"]) if objects else None


def _assert_complete(env, run_id: str) -> dict:
    """The run's manifest exists and every file it lists is stored with that size and SHA-256."""
    stored = env.objects(f"store/runs/{run_id}/")
    manifest = json.loads(stored[f"store/runs/{run_id}/manifest.json"])
    for entry in manifest["files"]:
        data = stored[f"store/runs/{run_id}/{entry['path']}"]
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"]), entry["path"]
    return manifest


def test_publish_layout_manifest_and_alias(s3env, s3_cfg, tmp_path):
    cfg = s3_cfg()
    store = s3env.store(tmp_path / "cache")
    run = stage_run(store, "run-1")

    published = publish_run(cfg, store, "run-1", **run.refs, flow_run_id="flow-123")

    manifest = _assert_complete(s3env, "run-1")
    paths = {f["path"] for f in manifest["files"]}
    assert paths == {
        *(f"model/{p}" for p in run.model_files),
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/README.md",  # written by publish: the base the adapter belongs on
        "eval/report.json",
        "eval/samples.jsonl",
        "data-report/report.json",
        "data-report/quarantine.jsonl",
    }
    assert published.files == 11
    card = s3env.objects("store/runs/run-1/adapter/README.md")["store/runs/run-1/adapter/README.md"].decode()
    assert "base_fingerprint: base-fp" in card and "base_model: tiny-llama" in card
    assert published.total_bytes == manifest["total_bytes"] == sum(f["size"] for f in manifest["files"])
    assert (
        published.alias_moved and published.alias_uri == f"s3://{s3env.bucket}/store/models/extractor/production.json"
    )
    lineage = manifest["lineage"]
    assert lineage["data"]["fingerprint"] == "data-0"
    assert lineage["base_model"] == {"id": "tiny-llama", "fingerprint": "base-fp", "compute_dtype": "float32"}
    assert lineage["recipe"]["fingerprint"] == recipe_fingerprint(cfg)
    assert lineage["config"]["publish"]["model_name"] == "extractor"
    assert lineage["config"]["evaluation"]["max_new_tokens"] == 128
    assert lineage["config"]["execution"]["s3"]["endpoint_url"] == s3env.proxy.url
    assert set(lineage["library_versions"]) >= {"torch", "transformers", "peft"}
    assert len(lineage["code_version"]) == 16
    assert manifest["flow_run_id"] == "flow-123"
    assert manifest["gate"] == {"passed": True, "reasons": ["loss improved"]}
    assert manifest["metrics"]["tuned"]["exact_match"] == 0.5

    alias = _alias(s3env)
    manifest_bytes = s3env.objects("store/runs/run-1/manifest.json")["store/runs/run-1/manifest.json"]
    assert alias["run_id"] == "run-1"
    assert alias["manifest_uri"] == published.manifest_uri
    assert alias["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert _alias(s3env, "latest")["run_id"] == "run-1"
    for part in ("adapter", "eval", "data-report"):
        assert store.is_complete(f"runs/run-1/{part}")


def test_publishing_twice_is_a_noop(s3env, s3_cfg, tmp_path):
    cfg = s3_cfg()
    store = s3env.store(tmp_path / "cache")
    run = stage_run(store, "run-1")
    first = publish_run(cfg, store, "run-1", **run.refs, flow_run_id="f1")
    before = s3env.objects("store/")
    writes = len([r for r in s3env.proxy.log if r[0] in ("PUT", "POST", "DELETE")])

    second = publish_run(cfg, store, "run-1", **run.refs, flow_run_id="f2")

    assert second == first
    assert s3env.objects("store/") == before
    assert len([r for r in s3env.proxy.log if r[0] in ("PUT", "POST", "DELETE")]) == writes


def test_same_run_with_different_content_is_refused(s3env, s3_cfg, tmp_path):
    cfg = s3_cfg()
    store = s3env.store(tmp_path / "cache")
    publish_run(cfg, store, "run-1", **stage_run(store, "run-1").refs)
    changed = stage_run(store, "run-1", seed=1)  # re-merged with other weights, same run id
    with pytest.raises(PublishError, match="publish the changed run under a new run id"):
        publish_run(cfg, store, "run-1", **changed.refs)
    assert _alias(s3env)["run_id"] == "run-1"


def test_failed_gate_publishes_without_moving_alias(s3env, s3_cfg, tmp_path):
    cfg = s3_cfg()
    store = s3env.store(tmp_path / "cache")
    publish_run(cfg, store, "good", **stage_run(store, "good").refs)
    published = publish_run(cfg, store, "bad", **stage_run(store, "bad", passed=False).refs)

    assert not published.alias_moved and published.alias_uri is None
    _assert_complete(s3env, "bad")
    assert _alias(s3env)["run_id"] == "good"
    assert _alias(s3env, "latest")["run_id"] == "good"


def test_uncommitted_model_is_refused(s3env, s3_cfg, tmp_path):
    store = s3env.store(tmp_path / "cache")
    run = stage_run(store, "run-1")
    s3env.raw.delete_object(Bucket=s3env.bucket, Key="store/runs/run-1/model/_COMPLETE")
    with pytest.raises(PublishError, match="never completed"):
        publish_run(s3_cfg(), store, "run-1", **run.refs)
    assert "store/runs/run-1/manifest.json" not in s3env.objects("store/runs/run-1/")


def test_concurrent_publishers_leave_alias_on_one_complete_run(s3env, s3_cfg, tmp_path):
    cfg = s3_cfg()
    runs = {f"race-{i}": stage_run(s3env.store(tmp_path / f"c{i}"), f"race-{i}", seed=i, model_mib=1) for i in range(3)}
    barrier = threading.Barrier(len(runs))
    results: dict[str, object] = {}

    def publish(run_id: str, i: int) -> None:
        store = s3env.store(tmp_path / f"c{i}")  # one client per publisher, as separate processes would have
        barrier.wait()
        results[run_id] = publish_run(cfg, store, run_id, **runs[run_id].refs)

    threads = [threading.Thread(target=publish, args=(run_id, i)) for i, run_id in enumerate(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert set(results) == set(runs)
    winner = _alias(s3env)["run_id"]
    assert winner in runs and results[winner].alias_moved
    manifest = _assert_complete(s3env, winner)
    assert (
        _alias(s3env)["manifest_sha256"]
        == hashlib.sha256(json.dumps(manifest, indent=2, sort_keys=True).encode()).hexdigest()
    )
    assert _alias(s3env, "latest")["run_id"] in runs
    for run_id in runs:  # every run is published completely, whether or not it holds the alias
        _assert_complete(s3env, run_id)


def test_endpoint_dies_mid_multipart_upload_then_recovers(s3env, s3_cfg, tmp_path):
    cfg = s3_cfg()
    store = s3env.store(tmp_path / "cache", max_attempts=2, connect_timeout_s=1)
    publish_run(cfg, store, "old", **stage_run(store, "old", model_mib=1).refs)
    parts = []

    def die_after_two_parts(method, path, headers):
        if "partNumber=" in path:
            parts.append(path)
            if len(parts) > 2:
                s3env.proxy.dark = True  # from here on every request is cut, like a killed server
                return Fault(drop=True)
        return None

    s3env.proxy.rule = die_after_two_parts
    with pytest.raises(Exception):
        stage_run(store, "new", model_mib=30)  # the merge stage's upload of a 30 MiB model (6 parts)

    # what storage holds after the crash: the old model is still production, nothing claims to be complete
    s3env.proxy.dark = False
    s3env.proxy.rule = None
    assert _alias(s3env)["run_id"] == "old"
    _assert_complete(s3env, "old")
    new_objects = s3env.objects("store/runs/new/")
    assert not any(k.endswith(("_COMPLETE", "manifest.json")) for k in new_objects)
    assert "store/runs/new/model/model.safetensors" not in new_objects
    assert s3env.raw.list_multipart_uploads(Bucket=s3env.bucket).get("Uploads")  # left behind by the crash

    # after the endpoint is back, the re-run aborts the stale upload, resumes and publishes
    run = stage_run(store, "new", model_mib=30)
    publish_run(cfg, store, "new", **run.refs)
    assert s3env.raw.list_multipart_uploads(Bucket=s3env.bucket).get("Uploads", []) == []
    assert _alias(s3env)["run_id"] == "new"
    _assert_complete(s3env, "new")


def test_endpoint_dies_during_publish_then_rerun_completes(s3env, s3_cfg, tmp_path):
    cfg = s3_cfg()
    store = s3env.store(tmp_path / "cache", max_attempts=2, connect_timeout_s=1)
    publish_run(cfg, store, "old", **stage_run(store, "old", model_mib=1).refs)
    run = stage_run(store, "new", model_mib=1)
    copies = []

    def die_after_three_copies(method, path, headers):
        if "x-amz-copy-source" in {k.lower() for k in headers}:
            copies.append(path)
            if len(copies) > 3:
                s3env.proxy.dark = True
        return None

    s3env.proxy.rule = die_after_three_copies
    with pytest.raises(Exception):
        publish_run(cfg, store, "new", **run.refs)
    s3env.proxy.dark = False
    s3env.proxy.rule = None

    assert _alias(s3env)["run_id"] == "old"
    assert "store/runs/new/manifest.json" not in s3env.objects("store/runs/new/")
    published = publish_run(cfg, store, "new", **run.refs)
    assert published.alias_moved
    assert _assert_complete(s3env, "new")["run_id"] == "new"


def test_local_store_publish_and_pull(tmp_path, chat_jsonl):
    cfg = load_config(None, {"data.train_path": str(chat_jsonl), "execution.store": str(tmp_path / "store")})
    store = LocalStore(tmp_path / "store")
    run = stage_run(store, "local-1", model_mib=1)
    published = publish_run(cfg, store, "local-1", **run.refs)
    assert published.alias_moved and published.files == 11
    pulled = pull_model(str(tmp_path / "store"), cfg.publish.model_name, "production", tmp_path / "pulled")
    assert {p.name: p.read_bytes() for p in pulled.iterdir() if p.name != "manifest.json"} == run.model_files


def test_redact_strips_credentials_but_keeps_settings():
    config = {
        "execution": {"s3": {"endpoint_url": "http://minio:KEY123@minio:9000", "session_token": "tok", "profile": "p"}},
        "evaluation": {"max_new_tokens": 128},
        "base_model": {"tokenizer_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "extra": [{"db_password": "pw"}],
    }
    assert redact(config) == {
        "execution": {"s3": {"endpoint_url": "http://minio:9000", "session_token": "***", "profile": "p"}},
        "evaluation": {"max_new_tokens": 128},
        "base_model": {"tokenizer_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "extra": [{"db_password": "***"}],
    }
