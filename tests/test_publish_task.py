"""The Prefect wrapper: transaction-keyed idempotency, artifacts, the model.published event,
and credentials from a Prefect Secret block that never leak into files or logs."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from prefect import flow
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH
from s3server import ACCESS_KEY, SECRET_KEY, moto_server, s3env, stage_run  # noqa: F401  (fixtures)

import tasks.publish as publish_module
from qlora_flow.config import load_config
from qlora_flow.store import open_store
from tasks.publish import publish_task


@pytest.fixture
def events(monkeypatch):
    sent: list[dict] = []

    def record(**kwargs):
        sent.append(kwargs)
        return real(**kwargs)

    real = publish_module.emit_event
    monkeypatch.setattr(publish_module, "emit_event", record)
    return sent


def _artifacts(key: str):
    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    import asyncio

    return asyncio.run(read())


def test_publish_task_is_idempotent_and_announces(prefect_api, s3env, chat_jsonl, tmp_path, events):
    cfg = load_config(None, {"data.train_path": str(chat_jsonl), "publish.model_name": "extractor"})
    store = s3env.store(tmp_path / "cache")
    run = stage_run(store, "run-tx")

    @flow
    def twice():
        first = publish_task(cfg, store, "run-tx", **run.refs)
        writes = len([r for r in s3env.proxy.log if r[0] in ("PUT", "POST", "DELETE")])
        second = publish_task(cfg, store, "run-tx", **run.refs)
        return first, second, writes

    first, second, writes = twice()

    assert second == first and first.alias_moved
    assert len([r for r in s3env.proxy.log if r[0] in ("PUT", "POST", "DELETE")]) == writes
    assert [e["event"] for e in events] == ["model.published"]
    payload = events[0]["payload"]
    assert payload["model"] == "extractor" and payload["run_id"] == "run-tx"
    assert payload["metrics"] == {"eval_loss": 1.0, "exact_match": 0.5} and payload["alias_moved"] is True
    manifest = json.loads(s3env.objects("store/runs/run-tx/manifest.json")["store/runs/run-tx/manifest.json"])
    assert manifest["flow_run_id"]  # the Prefect flow run that published it

    link = _artifacts("model-extractor")
    assert (
        link
        and link[0].type == "markdown"
        and f"qlora-flow pull extractor:production ./extractor --store {store.root}" in link[0].data
    )
    assert "[manifest.json](http" in link[0].data  # presigned: the browser can open it
    markdown = _artifacts("published-extractor")
    assert markdown and first.manifest_uri in markdown[0].data


def test_credentials_from_secret_block_never_leak(prefect_api, s3env, chat_jsonl, tmp_path, monkeypatch, caplog):
    Secret(value={"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}).save(
        "qf-s3-test", overwrite=True
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    started = time.time()
    cfg = load_config(
        None,
        {
            "data.train_path": str(chat_jsonl),
            "execution.store": f"s3://{s3env.bucket}/store",
            "execution.local_cache": str(tmp_path / "cache"),
            "execution.s3": s3env.settings(credentials_block="qf-s3-test").model_dump(),
        },
    )
    caplog.set_level(logging.DEBUG)
    store = open_store(cfg.execution)
    assert store.client._request_signer._credentials.access_key == ACCESS_KEY  # the block, not the environment
    run = stage_run(store, "run-secret")

    @flow
    def publish_flow():
        return publish_task(cfg, store, "run-secret", **run.refs)

    assert publish_flow().alias_moved

    assert SECRET_KEY not in caplog.text
    for key, data in s3env.objects().items():
        assert SECRET_KEY.encode() not in data, key
    result_dir = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    written = [
        p for root in (tmp_path, result_dir) for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= started
    ]
    assert any(p.suffix == ".safetensors" for p in written)
    for path in written:
        assert SECRET_KEY.encode() not in path.read_bytes(), path
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") is None


def _fixed_name_config(chat_jsonl, tmp_path):
    return load_config(
        None,
        {
            "data.train_path": str(chat_jsonl),
            "publish.model_name": "extractor",
            "execution.run_name": "nightly",
            "execution.store": str(tmp_path / "store"),
            "execution.local_cache": str(tmp_path / "cache"),
        },
    )


def test_fixed_run_name_of_a_published_run_is_refused_before_any_stage(prefect_api, chat_jsonl, tmp_path, monkeypatch):
    """A deployment that pins execution.run_name would otherwise re-merge over, and re-publish as, the last run."""
    import flows.pipeline as pipeline
    from flows.pipeline import qlora_pipeline
    from qlora_flow.config import ConfigError
    from tasks.publish import publish_run

    cfg = _fixed_name_config(chat_jsonl, tmp_path)
    store = open_store(cfg.execution)
    publish_run(cfg, store, "nightly", **stage_run(store, "nightly").refs, flow_run_id="an-earlier-flow-run")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*")}

    def stage(*args, **kwargs):
        raise AssertionError("a stage started")

    for name in ("validate_dataset_task", "prepare_base_model_task"):
        monkeypatch.setattr(pipeline, name, type("Stage", (), {"submit": staticmethod(stage)}))
    with pytest.raises(ConfigError, match=r"execution\.run_name.*'nightly'.*leave execution\.run_name empty"):
        qlora_pipeline(cfg)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*")} == before


def test_retry_of_the_same_flow_run_keeps_its_run_id(chat_jsonl, tmp_path, monkeypatch):
    """A flow run retried after its merge committed carries on; another flow run with that run id does not."""
    import flows.pipeline as pipeline
    from qlora_flow.config import ConfigError

    store = open_store(_fixed_name_config(chat_jsonl, tmp_path).execution)
    monkeypatch.setattr(pipeline.flow_run, "get_id", lambda: "flow-run-a")
    pipeline.claim_run_id(store, "nightly")
    store.workdir("runs/nightly/model")
    store.commit("runs/nightly/model")  # the first attempt merged, then publishing failed
    pipeline.claim_run_id(store, "nightly")  # its retry
    monkeypatch.setattr(pipeline.flow_run, "get_id", lambda: "flow-run-b")
    with pytest.raises(ConfigError, match="already has a finished run"):
        pipeline.claim_run_id(store, "nightly")
