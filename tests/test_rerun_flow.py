"""The whole flow run again on unchanged inputs is a cache hit end to end: no training, evaluation or merge,
no new model bytes, the alias still pull-verifiable, done in seconds. Then production moves (the gate is
decided again from the cached numbers) and an evaluation setting changes (evaluated again, not merged)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import tasks.evaluate
import tasks.merge
import tasks.train
from qlora_flow.pull import pull_model
from qlora_flow.store import LocalStore


def _safetensors(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*.safetensors")}


def _stored_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _spy(monkeypatch, module, name: str, allowed: set[str]) -> list:
    """Record calls of module.name; fail them (work a cache hit must not do) unless name is in allowed."""
    calls: list = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        if name not in allowed:
            raise AssertionError(f"{name} ran on a re-run that should have reused its result")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.slow
def test_unchanged_rerun_is_a_cache_hit_end_to_end(prefect_api, tiny_config, tmp_path, monkeypatch):
    from flows.pipeline import qlora_pipeline

    cfg = tiny_config
    cfg.evaluation.gate.max_regression_vs_production = 0.0  # every run is compared against production
    store_root = Path(cfg.execution.store)
    name = cfg.publish.model_name
    first_state = qlora_pipeline(cfg, return_state=True)
    assert first_state.is_completed() and first_state.name == "Completed", first_state.message
    first = first_state.result()
    assert first.status == "published"
    models_before, bytes_before = _safetensors(store_root), _stored_bytes(store_root)

    allowed: set[str] = set()
    trained = _spy(monkeypatch, tasks.train, "run_training", allowed)
    trained_in_child = _spy(monkeypatch, tasks.train, "run_training_in_child", allowed)
    measured = _spy(monkeypatch, tasks.evaluate, "measure", allowed)
    merged = _spy(monkeypatch, tasks.merge, "merge_adapter", allowed)
    started = time.perf_counter()
    state = qlora_pipeline(cfg, return_state=True)
    seconds = time.perf_counter() - started

    assert state.is_completed() and state.name == "Unchanged", state.message
    second = state.result()
    assert second.status == "unchanged" and second.run_id != first.run_id
    assert f"(run {first.run_id})" in state.message
    assert trained == trained_in_child == measured == merged == []
    assert second.adapter == first.adapter and second.merged == first.merged
    assert second.report.tuned_metrics == first.report.tuned_metrics and second.report.verdict.passed
    assert (
        second.published.same_as_run == first.run_id and second.published.manifest_uri == first.published.manifest_uri
    )
    # no model bytes anywhere in the store; the new run's record is its eval report and a pointer
    assert _safetensors(store_root) == models_before
    assert _stored_bytes(store_root) - bytes_before < 200_000
    record = json.loads((store_root / "runs" / second.run_id / "same-as.json").read_text())
    assert record["same_as_run"] == first.run_id and record["model_uri"] == f"runs/{first.run_id}/model"  # a key
    assert seconds < 30, f"unchanged re-run took {seconds:.1f} s"
    print(f"unchanged re-run of the tiny config: {seconds:.1f} s")

    alias = LocalStore(store_root).read_json(f"models/{name}/production.json")
    assert alias["run_id"] == first.run_id
    pulled = pull_model(str(store_root), name, "production", tmp_path / "pulled")
    assert json.loads((pulled / "manifest.json").read_text())["run_id"] == first.run_id
    assert {p.name for p in pulled.glob("*.safetensors")} == {
        p.name for p in Path(first.merged.uri).glob("*.safetensors")
    }

    # production moved to a better model: the cached numbers are gated against it, and now fail
    store = LocalStore(store_root)
    store.write_json(f"models/{name}/production.json", {"run_id": "better-model"})
    store.write_json("runs/better-model/eval/report.json", {"tuned_metrics": {"exact_match": 1.0, "loss": 0.01}})
    state = qlora_pipeline(cfg, return_state=True)
    assert state.is_failed() and state.name == "Rejected", state.message  # Failed-type: red in the runs list
    assert "production run better-model" in state.message
    assert measured == [] and merged == []

    # an evaluation setting changed: evaluated again, the merged model reused, published anew
    store.write_json(f"models/{name}/production.json", alias)
    cfg.evaluation.max_generation_samples = 2
    allowed.add("measure")
    state = qlora_pipeline(cfg, return_state=True)
    assert state.is_completed() and state.name == "Completed", state.message
    third = state.result()
    assert measured == ["measure"] and merged == []
    assert third.merged == first.merged and third.status == "published"
    assert third.report.tuned_metrics["generation_samples"] == 2
    assert {k for k in _safetensors(store_root).keys() - models_before.keys() if "/model/" in k} == set()
    pulled = pull_model(str(store_root), name, "production", tmp_path / "pulled-3")
    assert json.loads((pulled / "manifest.json").read_text())["run_id"] == third.run_id
