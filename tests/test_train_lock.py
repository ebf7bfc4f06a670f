"""Two flow runs asking for the same adapter at once: one trains, the other waits and reuses it."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import placeholder_adapter, placeholder_refs
from prefect import flow

import tasks.train as train_module
from qlora_flow.config import PipelineConfig
from qlora_flow.refs import AdapterRef, PreparedBase, ValidatedDataset


def _refs(tmp_path) -> tuple[PipelineConfig, ValidatedDataset, PreparedBase]:
    cfg = PipelineConfig.model_validate({"execution": {"store": str(tmp_path / "store"), "device": "cpu"}})
    data, base = placeholder_refs()
    return cfg, data, base


@pytest.mark.slow
def test_same_adapter_requested_twice_at_once_trains_once(prefect_api, tmp_path, monkeypatch):
    cfg, data, base = _refs(tmp_path)
    done: list[AdapterRef] = []
    running, overlap, calls = [0], [0], []
    guard = threading.Lock()

    def fake_train_adapter(cfg, store, data, base, on_line=print, on_progress=None):
        """Like the real one: return the stored adapter if a finished one exists, else 'train' for a while."""
        if done:
            calls.append("reused")
            return done[0]
        with guard:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
        time.sleep(2.0)
        with guard:
            running[0] -= 1
        calls.append("trained")
        ref = placeholder_adapter(seconds=2.0)
        done.append(ref)
        return ref

    monkeypatch.setattr(train_module, "train_adapter", fake_train_adapter)

    @flow
    def two_runs_at_once():
        first = train_module.train_adapter_task.submit(cfg, data, base)
        second = train_module.train_adapter_task.submit(cfg, data, base)
        return first.result(), second.result()

    first, second = two_runs_at_once()
    assert overlap[0] == 1, "two trainings of the same adapter ran at the same time"
    assert sorted(calls) == ["reused", "trained"] and first == second


def test_every_run_of_the_task_goes_through_the_verified_store_lookup(prefect_api, tmp_path, monkeypatch):
    """No Prefect cache answers for the store: with the adapter stored, a second run still calls train_adapter,
    whose check would quarantine and rebuild a copy damaged since (tests/test_self_healing.py)."""
    from qlora_flow.layout import trained_adapter_key
    from qlora_flow.store import open_store

    cfg, data, base = _refs(tmp_path)
    store = open_store(cfg.execution)
    key = trained_adapter_key(train_module.training_fingerprint(cfg, data, base))
    (store.workdir(key) / "adapter_model.safetensors").write_bytes(b"weights")
    store.commit(key)
    calls: list[str] = []
    ref = placeholder_adapter(store.uri(key))
    monkeypatch.setattr(train_module, "train_adapter", lambda *a, **k: calls.append("lookup") or ref)

    @flow
    def one_run():
        return train_module.train_adapter_task(cfg, data, base)

    assert one_run() == ref and one_run() == ref
    assert calls == ["lookup", "lookup"]


def test_different_adapters_do_not_share_a_lock(tmp_path):
    cfg, data, base = _refs(tmp_path)
    other = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 32})})
    assert train_module.training_lock_name(cfg, data, base) != train_module.training_lock_name(other, data, base)
    assert train_module.training_lock_name(cfg, data, base).startswith("train:")
