"""Corrupt caches are set aside and rebuilt (or resumed past); a copied or moved store keeps every cache hit."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from s3server import moto_server, s3env  # noqa: F401  (fixtures)
from safetensors.torch import load_file

from qlora_flow.store import LocalStore
from tasks.prepare_base import prepare_base_model
from tasks.train import adapter_key, newest_complete_checkpoint, train_adapter


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit of the last tensor's data: still loads, silently different weights
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))


def _reasons(store: LocalStore, under: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store.path / "quarantine" / under).glob("**/reason.json"))]


def _warned(caplog, *words: str) -> bool:
    return any(r.levelno == logging.WARNING and all(w in r.getMessage() for w in words) for r in caplog.records)


@pytest.mark.slow  # trains twice: 70-80 s on the shared 2-core test box
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(tiny_config, damage, caplog):
    from conftest import make_chat_rows
    from test_train import _dataset

    cfg = tiny_config.model_copy(deep=True)
    cfg.training.max_steps, cfg.training.save_steps = 8, 2
    cfg.lora.dropout = 0.1  # resumption must restore the RNG for dropout masks too
    store = LocalStore(cfg.execution.store)
    data = _dataset(store, make_chat_rows(48))
    base = prepare_base_model(cfg, store)
    uninterrupted = train_adapter(cfg, store, data, base)
    want = load_file(str(Path(uninterrupted.uri) / "adapter_model.safetensors"))

    key = adapter_key(uninterrupted.fingerprint)
    step, newest = newest_complete_checkpoint(store, f"{key}/checkpoints")
    assert step == 8
    _damage(store.path / newest / "adapter_model.safetensors", damage)
    shutil.rmtree(store.path / key / "adapter")

    with caplog.at_level(logging.WARNING):
        resumed = train_adapter(cfg, store, data, base)

    assert resumed.resumed_from_step == 6 and resumed.steps == 8
    assert [p.step for p in resumed.loss_history] == [p.step for p in uninterrupted.loss_history]
    for a, b in zip(resumed.loss_history, uninterrupted.loss_history):
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-5)
    got = load_file(str(Path(resumed.uri) / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)

    [reason] = _reasons(store, f"adapter/{key.rsplit('/', 1)[-1]}/checkpoints/checkpoint-8")
    assert reason["key"] == newest
    assert [(p["file"], p["problem"]) for p in reason["problems"]] == [
        ("adapter_model.safetensors", "size" if damage == "truncate" else "sha256")
    ]
    assert _warned(caplog, newest, "adapter_model.safetensors", "quarantine/")
    assert _warned(caplog, "checkpoint at step 8 failed verification")
    # the retrained step 8 is a verified checkpoint again
    assert store.verified(newest) is not None


def test_corrupt_adapter_is_rebuilt_from_its_final_checkpoint(tiny_config, caplog):
    from conftest import make_chat_rows
    from test_train import _dataset

    cfg = tiny_config
    store = LocalStore(cfg.execution.store)
    data = _dataset(store, make_chat_rows(24))
    base = prepare_base_model(cfg, store)
    first = train_adapter(cfg, store, data, base)
    weights = Path(first.uri) / "adapter_model.safetensors"
    want = weights.read_bytes()
    _damage(weights, "flip")

    with caplog.at_level(logging.WARNING):
        again = train_adapter(cfg, store, data, base)
    assert again.resumed_from_step == cfg.training.max_steps  # nothing left to train: the last checkpoint
    assert weights.read_bytes() == want
    assert len(_reasons(store, "adapter")) == 1 and _warned(caplog, "adapter_model.safetensors")


@pytest.mark.parametrize(("part", "damage"), [("nf4", "truncate"), ("nf4", "flip"), ("full", "truncate")])
def test_corrupt_base_cache_is_rebuilt(tiny_config, part, damage, caplog):
    cfg = tiny_config
    store = LocalStore(cfg.execution.store)
    base = prepare_base_model(cfg, store)
    prepare_base_model(cfg, store)  # a reuse: from here on only changed files are hashed again
    key = store.key_of(base.nf4_uri if part == "nf4" else base.full_precision_uri)
    marker = (store.path / key / "_COMPLETE").read_bytes()
    [shard] = sorted((store.path / key).glob("*.safetensors"))
    time.sleep(0.05)  # past the file system's timestamp granularity
    _damage(shard, damage)

    with caplog.at_level(logging.INFO):
        again = prepare_base_model(cfg, store)

    assert again.model_dump(exclude={"load_seconds"}) == base.model_dump(exclude={"load_seconds"})
    # rebuilt byte for byte: the new commit records the same sizes and SHA-256 as the first
    assert (store.path / key / "_COMPLETE").read_bytes() == marker
    assert store.verified(key) is not None
    [reason] = _reasons(store, "base")
    assert reason["key"] == key and reason["problems"][0]["file"] == shard.name
    assert _warned(caplog, key, shard.name, "quarantine/")
    rebuilt = "quantizing base model" if part == "nf4" else "importing base model"
    assert any(rebuilt in r.getMessage() for r in caplog.records)


def test_corrupt_validated_data_is_rebuilt(tiny_config, tiny_model_dir, caplog):
    from qlora_flow.models import load_tokenizer
    from tasks.validate import validate_dataset

    cfg = tiny_config
    store = LocalStore(cfg.execution.store)
    tokenizer = load_tokenizer(tiny_model_dir)
    first = validate_dataset(cfg, store, tokenizer)
    train_file = Path(first.train_uri)
    want = train_file.read_bytes()
    _damage(train_file, "flip")

    with caplog.at_level(logging.WARNING):
        again = validate_dataset(cfg, store, tokenizer)

    assert again == first and train_file.read_bytes() == want
    [reason] = _reasons(store, "data")
    assert reason["key"] == f"cache/data/{first.fingerprint}"
    assert [(p["file"], p["problem"]) for p in reason["problems"]] == [("train.parquet", "sha256")]
    assert _warned(caplog, "train.parquet", "quarantine/")


# ---------------------------------------------------------------- relocatable store


def _no_rebuilds(monkeypatch) -> None:
    """Every stage that would rebuild a cache entry fails the test if it is entered."""
    import tasks.evaluate
    import tasks.merge
    import tasks.prepare_base
    import tasks.train
    import tasks.validate

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} ran: a cache entry of the copied store was missed")

        return fail

    monkeypatch.setattr(tasks.train, "run_training", forbidden("training"))
    monkeypatch.setattr(tasks.train, "run_training_in_child", forbidden("training"))
    monkeypatch.setattr(tasks.validate, "_validate_into", forbidden("data validation"))
    monkeypatch.setattr(tasks.prepare_base, "_import_full_precision", forbidden("base import"))
    monkeypatch.setattr(tasks.prepare_base, "load_nf4_model", forbidden("quantization"))
    monkeypatch.setattr(tasks.evaluate, "measure", forbidden("evaluation"))
    monkeypatch.setattr(tasks.merge, "merge_adapter", forbidden("merge"))


def _as_legacy(root: Path, old_root: Path) -> None:
    """Rewrite a store into what stores written before this change hold: `ok` markers, absolute paths."""
    old = LocalStore(old_root)
    for marker in root.glob("cache/**/_COMPLETE"):
        marker.write_text("ok\n")
    for document in [
        *root.glob("cache/adapter/*/adapter/adapter_ref.json"),
        *root.glob("cache/data/*/report.json"),
        *root.glob("cache/*/*/entry.json"),
        *root.glob("runs/*/eval/report.json"),
    ]:
        document.write_text(json.dumps(old.as_uris(json.loads(document.read_text())), indent=2))
    for alias in root.glob("models/*/*.json"):
        pointer = json.loads(alias.read_text())
        pointer.pop("manifest_key")
        alias.write_text(json.dumps(pointer))
    assert str(old_root) in (next(root.glob("cache/adapter/*/adapter/adapter_ref.json"))).read_text()


@pytest.mark.slow
def test_copied_and_legacy_stores_keep_every_cache_hit(prefect_api, tiny_config, tmp_path, monkeypatch, caplog):
    from flows.pipeline import qlora_pipeline
    from qlora_flow.pull import pull_model

    cfg = tiny_config
    first = qlora_pipeline(cfg, return_state=True).result()
    assert first.status == "published"
    original = Path(cfg.execution.store)
    leaks = [
        p.relative_to(original).as_posix()
        for p in [*original.rglob("*.json"), *original.rglob("_COMPLETE")]
        if str(original) in p.read_text()
    ]
    # only for display: the published manifest's config, the aliases' URIs beside their keys, and PEFT's note of
    # where the base was loaded from (the pipeline always passes the base itself)
    assert all(p.startswith("models/") or p.endswith(("/manifest.json", "/adapter_config.json")) for p in leaks), leaks

    shutil.copytree(original, tmp_path / "copy", symlinks=True)
    shutil.copytree(original, tmp_path / "legacy", symlinks=True)
    _as_legacy(tmp_path / "legacy", original)
    shutil.move(original, tmp_path / "gone")  # nothing may still be read from the old place
    _no_rebuilds(monkeypatch)

    for name in ("copy", "legacy"):
        pulled = pull_model(
            str(tmp_path / name), cfg.publish.model_name, cfg.publish.alias, tmp_path / f"pulled-{name}"
        )
        assert json.loads((pulled / "manifest.json").read_text())["run_id"] == first.run_id
        moved = cfg.model_copy(deep=True)
        moved.execution.store = str(tmp_path / name)
        with caplog.at_level(logging.WARNING):
            state = qlora_pipeline(moved, return_state=True)
        assert state.is_completed() and state.name == "Unchanged", state.message  # every stage a cache hit
        result = state.result()
        assert result.status == "unchanged" and result.published.same_as_run == first.run_id
        assert result.adapter.fingerprint == first.adapter.fingerprint and result.adapter.steps == first.adapter.steps
        assert result.adapter.loss_history == first.adapter.loss_history  # the stored adapter, not a new training
        assert result.data.fingerprint == first.data.fingerprint and result.base.fingerprint == first.base.fingerprint
        for uri in (
            result.adapter.uri,
            result.data.train_uri,
            result.data.report_uri,
            result.base.nf4_uri,
            result.merged.uri,
            result.published.manifest_uri,
            result.published.model_uri,
        ):
            assert uri.startswith(str(tmp_path / name) + "/"), uri
        same_as = json.loads(Path(result.published.run_uri, "same-as.json").read_text())
        assert str(tmp_path / "gone") not in json.dumps(same_as) and same_as["same_as_run"] == first.run_id
        # the alias document, what a person or a serving tool reads, names this store now
        alias = json.loads(Path(result.published.alias_uri).read_text())
        assert (alias["manifest_uri"], alias["model_uri"]) == (
            result.published.manifest_uri,
            result.published.model_uri,
        )
        assert not (tmp_path / name / "quarantine").exists()
        # not Prefect's event client: under load it may log an ERROR quoting an artifact's description
        # ("0 quarantined") while it retries
        assert not [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING
            and not r.name.startswith("prefect._internal")
            and "quarantine" in r.getMessage()
        ]


def test_s3_store_mirrored_to_another_prefix_keeps_its_cache_hits(
    tiny_config, tiny_model_dir, s3env, tmp_path, monkeypatch
):
    """`aws s3 sync` / `mc mirror` of a store: the validated-data entry (report with keys, and a legacy one with
    absolute s3:// URIs of the old prefix) is found under the new prefix without validating again."""
    import tasks.validate
    from qlora_flow.models import load_tokenizer
    from tasks.validate import validate_dataset

    tokenizer = load_tokenizer(tiny_model_dir)
    first = validate_dataset(tiny_config, s3env.store(tmp_path / "c0"), tokenizer)
    for key, body in s3env.objects("store/").items():  # what a sync does: same bytes, new place
        s3env.raw.put_object(Bucket=s3env.bucket, Key="mirror/" + key.removeprefix("store/"), Body=body)
        s3env.raw.delete_object(Bucket=s3env.bucket, Key=key)
    monkeypatch.setattr(tasks.validate, "_validate_into", lambda *a: pytest.fail("validated again"))

    mirror = s3env.store(tmp_path / "c1", prefix="mirror")
    again = validate_dataset(tiny_config, mirror, tokenizer)
    assert again.fingerprint == first.fingerprint and again.n_train == first.n_train
    assert again.train_uri == f"s3://{s3env.bucket}/mirror/cache/data/{first.fingerprint}/train.parquet"
    assert again.report_uri == mirror.uri(f"cache/data/{first.fingerprint}/report.json")

    entry = f"cache/data/{first.fingerprint}"
    report = mirror.read_json(f"{entry}/report.json")
    assert report["report_uri"] == f"{entry}/report.json"  # stored as a key
    legacy = {
        **report,
        "report_uri": first.report_uri,
        "quarantine_uri": first.report_uri.replace("report.json", "quarantine.jsonl"),
    }
    assert legacy["report_uri"].startswith(f"s3://{s3env.bucket}/store/")
    (mirror.workdir(entry) / "report.json").write_text(json.dumps(legacy))
    mirror.commit(entry)
    assert json.loads(s3env.objects(f"mirror/{entry}/report.json")[f"mirror/{entry}/report.json"]) == legacy
    assert validate_dataset(tiny_config, s3env.store(tmp_path / "c2", prefix="mirror"), tokenizer) == again


@pytest.mark.slow
def test_a_healed_cache_s_warning_is_in_the_prefect_run_log(prefect_api, tiny_config):
    """The operator reads the run in Prefect's UI: the quarantine WARNING of a module logger must be there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import qlora_pipeline

    cfg = tiny_config
    first = qlora_pipeline(cfg, return_state=True).result()
    _damage(Path(first.data.train_uri), "flip")

    state = qlora_pipeline(cfg, return_state=True)
    assert state.is_completed() and state.result().data.fingerprint == first.data.fingerprint
    APILogHandler().flush()  # logs travel to the server in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    warnings = [log for log in logs if log.level == logging.WARNING and "quarantine/" in log.message]
    assert warnings and "train.parquet" in warnings[0].message, [(log.name, log.message) for log in logs][-15:]
    assert warnings[0].task_run_id is not None  # attributed to the validation task, as the UI shows it
