"""A sweep point trains under the pipeline's per-adapter lock, so it never shares a checkpoint directory with
a pipeline run (or another point) training the same adapter."""

from __future__ import annotations

import types
from contextlib import contextmanager

from conftest import placeholder_adapter, placeholder_refs
from prefect import flow

import flows.sweep as sweep
import tasks.train as train_module
from qlora_flow.config import PipelineConfig
from tasks.train import training_lock_name


def test_each_sweep_point_trains_under_the_pipelines_adapter_lock(tmp_path, monkeypatch):
    cfg = PipelineConfig.model_validate({"execution": {"store": str(tmp_path / "store"), "device": "cpu"}})
    data, base = placeholder_refs()
    held: list[str] = []
    trained: list[tuple[int, list[str]]] = []

    @contextmanager
    def fake_lock(name):
        held.append(name)
        yield
        held.remove(name)

    def fake_train_adapter(cfg, store, data, base, on_line=print, on_progress=None):
        trained.append((cfg.lora.r, list(held)))
        return placeholder_adapter(f"a{cfg.lora.r}")

    monkeypatch.setattr(train_module, "training_lock", fake_lock)
    monkeypatch.setattr(train_module, "train_adapter", fake_train_adapter)
    monkeypatch.setattr(
        sweep,
        "evaluate_adapter",
        lambda *a: types.SimpleNamespace(tuned_metrics={"loss": 1.0}, base_metrics={"loss": 2.0}),
    )
    ranks = [cfg.lora.r, 2 * cfg.lora.r]

    @flow
    def two_points():
        return [sweep.train_candidate(sweep.rank_config(cfg, r), f"run-r{r}", data, base) for r in ranks]

    two_points()
    assert trained == [(r, [training_lock_name(sweep.rank_config(cfg, r), data, base)]) for r in ranks]
    # the point with the config's own rank takes the very lock a pipeline run of that config takes
    assert trained[0][1] == [training_lock_name(cfg, data, base)]
