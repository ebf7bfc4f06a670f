"""Evaluation, merge and publish are keyed by fingerprints: a repeat reuses the earlier result, a changed input
computes again, and the gate is decided against the production model of the day."""

from __future__ import annotations

import json
import logging

import pytest
from s3server import moto_server, s3env, stage_run  # noqa: F401  (fixtures)

import tasks.evaluate as evaluate
import tasks.merge as merge
from qlora_flow.config import load_config
from qlora_flow.layout import SAME_AS_NAME
from qlora_flow.pull import PullError, pull_model
from qlora_flow.stage_cache import entry_key, evaluation_fingerprint, merge_fingerprint
from qlora_flow.store import LocalStore
from tasks.publish import publish_run
from tests.test_evaluate_support import run_inputs, tiny_adapter_dir  # noqa: F401  (fixtures)


class Recomputed(Exception):
    """Raised by a spy in place of work that a cache hit must not do."""


def _forbid(monkeypatch, module, name: str) -> list:
    calls: list = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise Recomputed(name)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_evaluation_is_measured_once_and_the_gate_decided_again(tiny_config, run_inputs, monkeypatch):
    cfg, r = tiny_config, run_inputs
    first = evaluate.evaluate_adapter(cfg, r.store, "run-1", r.data, r.base, r.adapter)
    assert first.fingerprint == evaluation_fingerprint(cfg, r.data, r.base, r.adapter)
    assert r.store.is_complete(entry_key("eval", first.fingerprint))

    calls = _forbid(monkeypatch, evaluate, "measure")
    second = evaluate.evaluate_adapter(cfg, r.store, "run-2", r.data, r.base, r.adapter)
    assert calls == []
    assert (second.base_metrics, second.tuned_metrics) == (first.base_metrics, first.tuned_metrics)
    assert second.verdict.passed and second.uri.endswith("runs/run-2/eval")
    samples = (r.store.path / "runs/run-2/eval/samples.jsonl").read_text()
    assert samples == (r.store.path / "runs/run-1/eval/samples.jsonl").read_text() and samples.count("\n") == 4

    # production moved to a better model: the cached numbers now fail the regression check
    r.store.write_json(f"models/{cfg.publish.model_name}/{cfg.publish.alias}.json", {"run_id": "prod-new"})
    r.store.write_json("runs/prod-new/eval/report.json", {"tuned_metrics": {"exact_match": 1.0, "loss": 0.1}})
    cfg.evaluation.gate.max_regression_vs_production = 0.0
    third = evaluate.evaluate_adapter(cfg, r.store, "run-3", r.data, r.base, r.adapter)
    assert calls == [] and not third.verdict.passed
    assert any(reason.startswith("FAIL") and "production run prod-new" in reason for reason in third.verdict.reasons)

    # an evaluation setting changes what is measured: evaluated again
    cfg.evaluation.max_generation_samples = 2
    with pytest.raises(Recomputed):
        evaluate.evaluate_adapter(cfg, r.store, "run-4", r.data, r.base, r.adapter)
    assert len(calls) == 1


def test_unreadable_eval_entry_is_measured_again(tiny_config, run_inputs, caplog):
    cfg, r = tiny_config, run_inputs
    first = evaluate.evaluate_adapter(cfg, r.store, "run-1", r.data, r.base, r.adapter)
    (r.store.path / entry_key("eval", first.fingerprint) / "entry.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        again = evaluate.evaluate_adapter(cfg, r.store, "run-2", r.data, r.base, r.adapter)
    # its recorded size no longer matches: set aside in quarantine/, with a WARNING
    assert "entry.json" in caplog.text and "quarantine/eval/" in caplog.text
    assert list((r.store.path / "quarantine" / "eval").glob("*/*/entry/entry.json"))
    assert again.tuned_metrics == first.tuned_metrics
    entry = json.loads((r.store.path / entry_key("eval", first.fingerprint) / "entry.json").read_text())
    assert entry["tuned_metrics"] == first.tuned_metrics  # rewritten


def test_merge_is_reused_until_its_inputs_change(tiny_config, run_inputs, monkeypatch, caplog):
    cfg, r = tiny_config, run_inputs
    cfg.merge.min_top1_agreement = 0.95  # the random tiny model has many near-ties (see test_merge.py)
    first = merge.merge_or_reuse(cfg, r.store, "run-1", r.base, r.adapter, data=r.data)
    assert first.uri == r.store.uri("runs/run-1/model")

    calls = _forbid(monkeypatch, merge, "merge_adapter")
    assert merge.merge_or_reuse(cfg, r.store, "run-2", r.base, r.adapter, data=r.data) == first
    cfg.evaluation.max_generation_samples = 2  # evaluation settings other than the verification budget: same merge
    assert merge.merge_or_reuse(cfg, r.store, "run-3", r.base, r.adapter, data=r.data) == first
    assert calls == [] and not r.store.exists("runs/run-2/model") and not r.store.exists("runs/run-3/model")

    cfg.merge.verify_prompts = 1  # a merge setting: merged again
    assert merge_fingerprint(cfg, r.base, r.adapter, r.data) != merge_fingerprint(
        cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"verify_prompts": 2})}), r.base, r.adapter, r.data
    )
    with pytest.raises(Recomputed):
        merge.merge_or_reuse(cfg, r.store, "run-4", r.base, r.adapter, data=r.data)

    cfg.merge.verify_prompts = 2
    (r.store.path / "runs/run-1/model/_COMPLETE").unlink()  # the model the entry names is gone: merged again
    with caplog.at_level(logging.WARNING, logger="tasks.merge"), pytest.raises(Recomputed):
        merge.merge_or_reuse(cfg, r.store, "run-5", r.base, r.adapter, data=r.data)
    assert "gone or incomplete; merging again" in caplog.text and len(calls) == 2


def _files(store: LocalStore, prefix: str) -> set[str]:
    return set(store.list(prefix))


def test_publish_of_a_repeat_stores_nothing_and_stays_pullable(tmp_path, chat_jsonl):
    cfg = load_config(None, {"data.train_path": str(chat_jsonl), "execution.store": str(tmp_path / "store")})
    store = LocalStore(tmp_path / "store")
    run = stage_run(store, "run-1")
    refs = run.refs | {"report": run.refs["report"].model_copy(update={"fingerprint": "eval-fp"})}
    first = publish_run(cfg, store, "run-1", **refs)
    assert first.alias_moved and first.same_as_run is None
    alias = store.read_json(f"models/{cfg.publish.model_name}/production.json")
    before = {k: store.file_info(k) for k in store.list("") if not k.startswith("runs/run-2")}

    repeat = publish_run(cfg, store, "run-2", **refs, flow_run_id="flow-2")
    assert repeat.same_as_run == "run-1" and not repeat.alias_moved
    assert repeat.manifest_uri == first.manifest_uri and repeat.model_uri == first.model_uri
    assert _files(store, "runs/run-2") == {f"runs/run-2/{SAME_AS_NAME}"}
    record = store.read_json(f"runs/run-2/{SAME_AS_NAME}")
    assert record["same_as_run"] == "run-1" and record["manifest_sha256"] == alias["manifest_sha256"]
    assert store.read_json(f"models/{cfg.publish.model_name}/production.json") == alias
    assert {k: store.file_info(k) for k in store.list("") if not k.startswith("runs/run-2")} == before
    pulled = pull_model(str(tmp_path / "store"), cfg.publish.model_name, "production", tmp_path / "pulled")
    assert {p.name: p.read_bytes() for p in pulled.iterdir() if p.name != "manifest.json"} == run.model_files

    # new numbers for the same model (an evaluation setting changed): a new manifest that moves the alias and
    # names the model files where run-1 stored them instead of copying them
    changed = refs | {"report": refs["report"].model_copy(update={"fingerprint": "eval-fp-2"})}
    third = publish_run(cfg, store, "run-3", **changed)
    assert third.alias_moved and third.same_as_run is None and third.model_uri == first.model_uri
    assert not store.exists("runs/run-3/model")
    manifest = store.read_json("runs/run-3/manifest.json")
    model_entries = [f for f in manifest["files"] if f["path"].startswith("model/")]
    assert {f["stored_at"] for f in model_entries} == {f"runs/run-1/{f['path']}" for f in model_entries}
    pulled = pull_model(str(tmp_path / "store"), cfg.publish.model_name, "production", tmp_path / "pulled-3")
    assert json.loads((pulled / "manifest.json").read_text())["run_id"] == "run-3"
    assert {p.name: p.read_bytes() for p in pulled.iterdir() if p.name != "manifest.json"} == run.model_files
    # and the SHA-256 list still guards those bytes
    (store.path / "runs/run-1/model/tokenizer.json").write_bytes(b"changed after publishing")
    with pytest.raises(PullError, match="tokenizer.json of .* failed verification"):
        pull_model(str(tmp_path / "store"), cfg.publish.model_name, "production", tmp_path / "pulled-4")


def test_damaged_served_publication_is_published_again(tmp_path, chat_jsonl, caplog):
    cfg = load_config(None, {"data.train_path": str(chat_jsonl), "execution.store": str(tmp_path / "store")})
    store = LocalStore(tmp_path / "store")
    run = stage_run(store, "run-1")
    refs = run.refs | {"report": run.refs["report"].model_copy(update={"fingerprint": "eval-fp"})}
    publish_run(cfg, store, "run-1", **refs)
    (store.path / "runs/run-1/adapter/adapter_config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="tasks.publish"):
        again = publish_run(cfg, store, "run-2", **refs)
    assert "damaged; publishing it again" in caplog.text and "adapter/adapter_config.json" in caplog.text
    assert again.alias_moved and again.same_as_run is None
    pulled = pull_model(str(tmp_path / "store"), cfg.publish.model_name, "production", tmp_path / "pulled")
    assert {p.name: p.read_bytes() for p in pulled.iterdir() if p.name != "manifest.json"} == run.model_files


def test_alias_without_a_readable_manifest_does_not_block_publishing(tmp_path, chat_jsonl, caplog):
    cfg = load_config(None, {"data.train_path": str(chat_jsonl), "execution.store": str(tmp_path / "store")})
    store = LocalStore(tmp_path / "store")
    store.write_json(f"models/{cfg.publish.model_name}/production.json", {"run_id": "hand-written"})
    run = stage_run(store, "run-1")
    refs = run.refs | {"report": run.refs["report"].model_copy(update={"fingerprint": "eval-fp"})}
    with caplog.at_level(logging.WARNING, logger="tasks.publish"):
        published = publish_run(cfg, store, "run-1", **refs)
    assert "names no readable manifest" in caplog.text
    assert (
        published.alias_moved
        and store.read_json(f"models/{cfg.publish.model_name}/production.json")["run_id"] == "run-1"
    )


def test_repeat_and_reused_model_on_s3(s3env, chat_jsonl, tmp_path):
    """The same on S3: a repeat uploads nothing, a reused model is named where it lies, both pull verified."""
    cfg = load_config(None, {"data.train_path": str(chat_jsonl), "publish.model_name": "extractor"})
    store = s3env.store(tmp_path / "cache")
    run = stage_run(store, "run-1")
    refs = run.refs | {"report": run.refs["report"].model_copy(update={"fingerprint": "eval-fp"})}
    publish_run(cfg, store, "run-1", **refs)
    objects = s3env.objects("store/")

    assert publish_run(cfg, store, "run-2", **refs).same_as_run == "run-1"
    assert s3env.objects("store/").keys() - objects.keys() == {f"store/runs/run-2/{SAME_AS_NAME}"}

    changed = refs | {"report": refs["report"].model_copy(update={"fingerprint": "eval-fp-2"})}
    assert publish_run(cfg, store, "run-3", **changed).alias_moved
    assert not [k for k in s3env.objects("store/runs/run-3/") if "/model/" in k]
    for alias, dest in (("production", "p"), ("latest", "l")):
        pulled = pull_model(f"s3://{s3env.bucket}/store", "extractor", alias, tmp_path / dest, s3=s3env.settings())
        assert json.loads((pulled / "manifest.json").read_text())["run_id"] == "run-3"
        assert {p.name: p.read_bytes() for p in pulled.iterdir() if p.name != "manifest.json"} == run.model_files
