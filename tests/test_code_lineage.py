"""Code lineage (qlora_flow/code_lineage.py): results cached by earlier code declared equivalent are adopted once
and then hit directly; the table cannot fall behind the code without this file failing."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from s3server import moto_server, s3env  # noqa: F401  (fixtures)

import tasks.evaluate as evaluate
import tasks.merge as merge
import tasks.train as train
import tasks.validate as validate
from qlora_flow.code_lineage import GROUPS, CodeGroup, code_hash, code_hashes, find_result, training_modules
from qlora_flow.layout import adoption_key, trained_adapter_key
from qlora_flow.refs import AdapterRef, LossPoint, MergedModel
from qlora_flow.stage_cache import Measurement, MergeEntry, evaluation_fingerprints, merge_fingerprints, write_entry
from qlora_flow.store import LocalStore
from qlora_flow.training_backends import TRAINING_BACKENDS
from tasks.prepare_base import prepare_base_model
from tests.test_evaluate_support import run_inputs, tiny_adapter_dir  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
# the code hashes main's fingerprints computed before the refactor (25b5f32, 551919b) and before this change
TRAINING_25B5F32 = "038af1992a546545"
EVALUATION_551919B = "766fe1ea68257533"
MERGE_551919B = "5a734344aac87740"
VALIDATION_25B5F32 = "3c9e6f0fab88426b655e29da4eb319a838c9b15222dc69074c28a9667679d391"


def test_every_hashed_code_group_is_recorded_as_the_last_version_of_its_lineage():
    """Fails after an edit to a hashed module until the developer declares what it does to cached results."""
    behind = {group: code_hash(group) for group, entry in GROUPS.items() if code_hash(group) != entry.lineage[-1]}
    assert not behind, (
        "the code of these groups changed since qlora_flow/code_lineage.py recorded it: "
        + ", ".join(
            f"{group} is now {found!r} (modules {', '.join(GROUPS[group].modules)})" for group, found in behind.items()
        )
        + ". If the edit keeps every result the same (refactor, comments, formatting), append the new hash to the"
        " group's lineage: caches of the earlier versions stay in use. If it changes results, replace the lineage"
        " by the new hash alone: that stage computes everything again."
    )


def test_no_stage_hashes_its_code_outside_the_lineage_table():
    """A fingerprint that calls code_version itself would miss on every edit with no way to declare it."""
    allowed = {"qlora_flow/fingerprint.py", "qlora_flow/code_lineage.py", "tasks/publish.py"}  # publish: a record
    callers = {
        path.relative_to(ROOT).as_posix()
        for package in ("qlora_flow", "tasks", "flows")
        for path in (ROOT / package).rglob("*.py")
        if re.search(r"\b(code_version|source_digest)\(", path.read_text())
    }
    assert callers <= allowed, f"call code_lineage.code_hashes(group) instead in: {sorted(callers - allowed)}"


def test_earlier_versions_count_only_while_todays_code_is_the_recorded_one(monkeypatch):
    current = code_hash("training")
    lineage = GROUPS["training"].lineage
    assert code_hashes("training") == [current, *reversed(lineage[:-1])]
    assert TRAINING_25B5F32 in code_hashes("training")
    # another training backend's code has no earlier versions declared
    monkeypatch.setitem(TRAINING_BACKENDS, "fake", "tests.fake_training_backend")
    assert code_hashes("training", training_modules("trl")) == code_hashes("training")
    assert len(code_hashes("training", training_modules("fake"))) == 1
    # an edit not declared yet: nothing earlier is adopted
    monkeypatch.setitem(GROUPS, "training", CodeGroup(GROUPS["training"].modules, lineage, digest=lambda *m: "edited"))
    assert code_hashes("training") == ["edited"]


def test_find_result_follows_its_record_and_adopts_again_when_the_named_entry_is_gone(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    entries = {"old-2": "two", "old-1": "one"}
    fingerprints = ["today", "old-2", "old-1"]
    record = adoption_key("eval", "today")

    with caplog.at_level(logging.INFO, logger="qlora_flow.code_lineage"):
        assert find_result(store, "eval", fingerprints, entries.get) == ("old-2", "two")
        assert store.read_json(record) == {"fingerprint": "old-2"}
        assert find_result(store, "eval", fingerprints, entries.get) == ("old-2", "two")
        assert len(caplog.records) == 1
        del entries["old-2"]  # quarantined since
        assert find_result(store, "eval", fingerprints, entries.get) == ("old-1", "one")
        assert store.read_json(record) == {"fingerprint": "old-1"} and len(caplog.records) == 2
        # a record naming a fingerprint the lineage no longer lists is not followed
        store.write_json(record, {"fingerprint": "undeclared"})
        entries["undeclared"] = "x"
        assert find_result(store, "eval", fingerprints, entries.get) == ("old-1", "one")
        entries["today"] = "now"
        assert find_result(store, "eval", fingerprints, entries.get) == ("today", "now")
    assert find_result(store, "eval", ["other"], entries.get) is None


# ---------------------------------------------------------------- the training stage


def _training_inputs(cfg, store):
    from conftest import make_chat_rows
    from test_train import _dataset

    return _dataset(store, make_chat_rows(16)), prepare_base_model(cfg, store)


def _legacy_fingerprint(fingerprints: list[str], group: str, code: str) -> str:
    return fingerprints[code_hashes(group).index(code)]


def _store_adapter(store, fingerprint: str, adapter_dir: Path) -> AdapterRef:
    """An adapter entry as the training stage commits it, under fingerprint."""
    key = trained_adapter_key(fingerprint)
    shutil.copytree(adapter_dir, store.workdir(key), dirs_exist_ok=True)
    ref = AdapterRef(
        uri=store.uri(key),
        checkpoint_uri=store.uri(key.replace("/adapter", "/checkpoints")),
        fingerprint=fingerprint,
        trainable_parameters=123,
        steps=6,
        loss_history=[LossPoint(step=s, loss=3.0 - 0.1 * s) for s in range(1, 7)],
        tokens_seen=1000,
        train_seconds=1.0,
        tokens_per_second=1000.0,
    )
    (store.workdir(key) / "adapter_ref.json").write_text(json.dumps(store.as_keys(ref.model_dump(mode="json"))))
    store.commit(key)
    return ref


def _forbid_training(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("trained although an adapter of equivalent code is stored")

    monkeypatch.setattr(train, "run_training", refuse)
    monkeypatch.setattr(train, "run_training_in_child", refuse)


def _adoptions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "adopting the one stored under" in r.getMessage()]


def test_adapter_trained_by_the_pre_refactor_code_is_adopted_once(
    tiny_config, tiny_adapter_dir, tmp_path, monkeypatch, caplog
):
    cfg = tiny_config
    store = LocalStore(cfg.execution.store)
    data, base = _training_inputs(cfg, store)
    fingerprints = train.training_fingerprints(cfg, data, base)
    today, legacy = fingerprints[0], _legacy_fingerprint(fingerprints, "training", TRAINING_25B5F32)
    stored = _store_adapter(store, legacy, tiny_adapter_dir)
    _forbid_training(monkeypatch)

    with caplog.at_level(logging.INFO):
        ref = train.train_adapter(cfg, store, data, base)
    assert ref == stored  # used as it is: its fingerprint keys the evaluation and merge cached for it
    [line] = _adoptions(caplog)
    assert f"adapter cache: fingerprint {today[:24]} " in line and f"fingerprint {legacy[:24]} " in line
    record = adoption_key("adapter", today)
    assert store.read_json(record) == {"fingerprint": legacy} and store.uri(record) in line

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train.train_adapter(cfg, store, data, base) == stored
    assert _adoptions(caplog) == []

    # a copied store keeps the adoption: the record holds a fingerprint, not a path
    moved = LocalStore(shutil.copytree(store.path, tmp_path / "moved"))
    with caplog.at_level(logging.INFO):
        again = train.train_adapter(cfg, moved, data, base)
    assert again.uri == moved.uri(trained_adapter_key(legacy)) and again.fingerprint == legacy
    assert _adoptions(caplog) == []


def test_corrupt_legacy_adapter_is_quarantined_not_adopted_and_training_runs(
    tiny_config, tiny_adapter_dir, monkeypatch, caplog
):
    cfg = tiny_config
    store = LocalStore(cfg.execution.store)
    data, base = _training_inputs(cfg, store)
    fingerprints = train.training_fingerprints(cfg, data, base)
    legacy = _legacy_fingerprint(fingerprints, "training", TRAINING_25B5F32)
    _store_adapter(store, legacy, tiny_adapter_dir)
    weights = store.path / trained_adapter_key(legacy) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    trained: list[str] = []

    def spy(cfg, store, data, base, on_progress=None):
        trained.append(train.training_fingerprint(cfg, data, base))
        raise RuntimeError("training entered")

    monkeypatch.setattr(train, "run_training", spy)
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError, match="training entered"):
        train.train_adapter(cfg, store, data, base)

    assert trained == [fingerprints[0]]  # trains under today's fingerprint
    assert _adoptions(caplog) == [] and not store.exists(adoption_key("adapter", fingerprints[0]))
    assert not store.exists(trained_adapter_key(legacy))
    [reason] = [json.loads(p.read_text()) for p in (store.path / "quarantine" / "adapter").glob("**/reason.json")]
    assert reason["key"] == trained_adapter_key(legacy) and reason["problems"][0]["file"] == "adapter_model.safetensors"
    assert any(r.levelno == logging.WARNING and "adapter_model.safetensors" in r.getMessage() for r in caplog.records)


def test_training_cut_off_under_earlier_code_resumes_from_its_checkpoint(tiny_config, monkeypatch, caplog):
    from safetensors.torch import load_file

    cfg = tiny_config.model_copy(deep=True)
    cfg.training.max_steps, cfg.training.save_steps = 4, 2
    store = LocalStore(cfg.execution.store)
    data, base = _training_inputs(cfg, store)
    fingerprints = train.training_fingerprints(cfg, data, base)
    legacy = _legacy_fingerprint(fingerprints, "training", TRAINING_25B5F32)
    real = train.training_fingerprints
    monkeypatch.setattr(train, "training_fingerprints", lambda *a: [legacy])  # the earlier code trains...
    earlier = train.train_adapter(cfg, store, data, base)
    want = load_file(str(Path(earlier.uri) / "adapter_model.safetensors"))
    shutil.rmtree(store.path / trained_adapter_key(legacy))  # ...and is killed after its last checkpoint
    monkeypatch.setattr(train, "training_fingerprints", real)

    with caplog.at_level(logging.INFO):
        resumed = train.train_adapter(cfg, store, data, base)
    assert resumed.fingerprint == fingerprints[0] and resumed.resumed_from_step == 4 and resumed.steps == 4
    assert any(f"resuming from a checkpoint of fingerprint {legacy[:24]}" in r.getMessage() for r in caplog.records)
    got = load_file(str(Path(resumed.uri) / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)


def test_s3_adoption_survives_a_mirror_of_the_bucket_prefix(
    tiny_config, tiny_adapter_dir, s3env, tmp_path, monkeypatch, caplog
):
    cfg = tiny_config
    local = LocalStore(cfg.execution.store)
    data, base = _training_inputs(cfg, local)  # inputs stay local: only the adapter lookup is under test
    fingerprints = train.training_fingerprints(cfg, data, base)
    legacy = _legacy_fingerprint(fingerprints, "training", TRAINING_25B5F32)
    s3 = s3env.store(tmp_path / "c0")
    _store_adapter(s3, legacy, tiny_adapter_dir)
    _forbid_training(monkeypatch)

    with caplog.at_level(logging.INFO):
        assert train.train_adapter(cfg, s3, data, base).fingerprint == legacy
    assert len(_adoptions(caplog)) == 1
    for key, body in s3env.objects("store/").items():  # what `aws s3 sync` does
        s3env.raw.put_object(Bucket=s3env.bucket, Key="mirror/" + key.removeprefix("store/"), Body=body)
    caplog.clear()
    mirror = s3env.store(tmp_path / "c1", prefix="mirror")
    with caplog.at_level(logging.INFO):
        ref = train.train_adapter(cfg, mirror, data, base)
    assert ref.uri == mirror.uri(trained_adapter_key(legacy)) and _adoptions(caplog) == []


# ---------------------------------------------------------------- evaluation, merge, validation


def test_evaluation_and_merge_cached_before_the_refactor_are_adopted(tiny_config, run_inputs, monkeypatch, caplog):
    cfg, r = tiny_config, run_inputs
    eval_fps = evaluation_fingerprints(cfg, r.data, r.base, r.adapter)
    legacy_eval = _legacy_fingerprint(eval_fps, "evaluation", EVALUATION_551919B)
    measured = Measurement(
        base_metrics={"loss": 3.0, "exact_match": 0.0},
        tuned_metrics={"loss": 2.0, "exact_match": 0.5},
        base_answers=["b"] * 4,
        tuned_answers=["t"] * 4,
    )
    write_entry(r.store, "eval", legacy_eval, measured)
    model_key = "runs/run-0/model"
    (r.store.workdir(model_key) / "model.safetensors").write_bytes(b"weights")
    merged = MergedModel(uri=r.store.commit(model_key), fingerprint="merged-fp", dtype="float32", verification={})
    merge_fps = merge_fingerprints(cfg, r.base, r.adapter, r.data)
    legacy_merge = _legacy_fingerprint(merge_fps, "merge", MERGE_551919B)
    write_entry(r.store, "merged", legacy_merge, MergeEntry(merged=merged, run_id="run-0"))
    monkeypatch.setattr(evaluate, "measure", lambda *a: pytest.fail("measured again"))
    monkeypatch.setattr(merge, "merge_adapter", lambda *a: pytest.fail("merged again"))

    for run in ("run-1", "run-2"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            report = evaluate.evaluate_adapter(cfg, r.store, run, r.data, r.base, r.adapter)
            assert merge.merge_or_reuse(cfg, r.store, run, r.base, r.adapter, report, r.data) == merged
        # the earlier entry's fingerprint is the report's: a publication of the same model stays the same one
        assert report.fingerprint == legacy_eval and report.tuned_metrics == measured.tuned_metrics
        lines = _adoptions(caplog)
        if run == "run-1":
            assert len(lines) == 2
            assert f"eval cache: fingerprint {eval_fps[0][:24]} " in lines[0] and legacy_eval[:24] in lines[0]
            assert f"merged cache: fingerprint {merge_fps[0][:24]} " in lines[1] and legacy_merge[:24] in lines[1]
        else:
            assert lines == []


def _validating_as(monkeypatch, code: str) -> None:
    """The validation code reads as `code`, recorded as the only version: a store written by that version."""
    monkeypatch.setitem(GROUPS, "validation", CodeGroup(GROUPS["validation"].modules, (code,), digest=lambda *m: code))


def test_validated_data_of_the_pre_refactor_code_is_kept_when_todays_pass_writes_the_same_files(
    tiny_config, tiny_model_dir, monkeypatch, caplog
):
    from qlora_flow.models import load_tokenizer

    cfg, tokenizer = tiny_config, load_tokenizer(tiny_model_dir)
    store = LocalStore(cfg.execution.store)
    with monkeypatch.context() as patch:
        _validating_as(patch, VALIDATION_25B5F32)
        legacy = validate.validate_dataset(cfg, store, tokenizer)

    passes = []
    real_pass = validate._validate_into
    monkeypatch.setattr(validate, "_validate_into", lambda *a: passes.append(1) or real_pass(*a))
    with caplog.at_level(logging.INFO):
        today = validate.validate_dataset(cfg, store, tokenizer)
    assert today == legacy and passes == [1]  # one pass to compare, then the earlier entry and fingerprint
    [line] = _adoptions(caplog)
    assert line.startswith("data cache: ") and legacy.fingerprint[:24] in line
    assert [p.name for p in (store.path / "cache" / "data").iterdir()] == [legacy.fingerprint]

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert validate.validate_dataset(cfg, store, tokenizer) == legacy
    assert passes == [1] and _adoptions(caplog) == []


def test_validated_data_of_earlier_code_with_other_files_is_not_kept(tiny_config, tiny_model_dir, monkeypatch, caplog):
    import pyarrow.parquet as pq

    from qlora_flow.layout import data_key
    from qlora_flow.models import load_tokenizer

    cfg, tokenizer = tiny_config, load_tokenizer(tiny_model_dir)
    store = LocalStore(cfg.execution.store)
    with monkeypatch.context() as patch:
        _validating_as(patch, VALIDATION_25B5F32)
        legacy = validate.validate_dataset(cfg, store, tokenizer)
    # what the earlier version decided differently: one training row fewer (committed, so it verifies)
    key = data_key(legacy.fingerprint)
    train_file = store.workdir(key) / "train.parquet"
    pq.write_table(pq.read_table(train_file).slice(1), train_file)
    store.commit(key)

    with caplog.at_level(logging.INFO):
        today = validate.validate_dataset(cfg, store, tokenizer)
    assert today.fingerprint != legacy.fingerprint and today.n_train == legacy.n_train
    assert _adoptions(caplog) == []
