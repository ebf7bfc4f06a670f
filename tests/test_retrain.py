"""Scheduled retraining is incremental: unchanged data and base end as a quick no-op, changes retrain."""

from __future__ import annotations

import json

from flows.retrain import Fingerprints, current_fingerprints, decide, scheduled_retrain
from qlora_flow.layout import alias_key
from qlora_flow.store import open_store


def _publish_fake_production(cfg, fingerprints: Fingerprints, run_id: str = "prod-run-1") -> None:
    """The two documents retraining reads: the alias and the lineage part of the run's manifest."""
    store = open_store(cfg.execution)
    lineage = {"data": {"fingerprint": fingerprints.data}, "base_model": {"fingerprint": fingerprints.base}}
    if fingerprints.recipe is not None:
        lineage["recipe"] = {"fingerprint": fingerprints.recipe}
    store.write_json(f"runs/{run_id}/manifest.json", {"run_id": run_id, "lineage": lineage})
    store.swap_alias(alias_key(cfg.publish.model_name, cfg.publish.alias), {"run_id": run_id}, None)


def test_no_production_model_means_retrain(tiny_config):
    decision = decide(tiny_config, Fingerprints(data="d", base="b"))
    assert decision.retrain and "no demo-extractor:production model yet" in decision.reason


def test_unchanged_inputs_end_as_a_no_op_without_training(tiny_config):
    _publish_fake_production(tiny_config, current_fingerprints.fn(tiny_config))

    state = scheduled_retrain(tiny_config, return_state=True)

    assert state.is_completed() and state.name == "Unchanged"
    assert "unchanged since demo-extractor:production (run prod-run-1)" in state.message
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the runs list says what ran: kind, model, data, date
        assert client.read_flow_run(state.state_details.flow_run_id).name.startswith("retrain demo-extractor | ")
    decision = state.result()
    assert decision.retrain is False and decision.production_run == "prod-run-1"
    store = open_store(tiny_config.execution)
    assert store.list("cache/adapter") == [], "a no-op must not train"


def test_changed_data_or_base_triggers_retraining(tiny_config, chat_jsonl):
    current = current_fingerprints.fn(tiny_config)
    _publish_fake_production(tiny_config, current)
    assert not decide(tiny_config, current).retrain

    with chat_jsonl.open("a") as fh:
        fh.write(
            json.dumps({"messages": [{"role": "user", "content": "new row"}, {"role": "assistant", "content": "{}"}]})
            + "\n"
        )
    changed = current_fingerprints.fn(tiny_config)
    assert changed.data != current.data and changed.base == current.base
    decision = decide(tiny_config, changed)
    assert decision.retrain and decision.reason.startswith("data changed since demo-extractor:production")

    decision = decide(tiny_config, current.model_copy(update={"base": "another-base"}))
    assert decision.retrain and decision.reason.startswith("base changed")


def test_changed_training_settings_trigger_retraining(tiny_config):
    current = current_fingerprints.fn(tiny_config)
    _publish_fake_production(tiny_config, current)
    assert not decide(tiny_config, current).retrain

    bigger_rank = tiny_config.model_copy(deep=True)
    bigger_rank.lora.r = 8
    changed = current_fingerprints.fn(bigger_rank)
    assert (changed.data, changed.base) == (current.data, current.base) and changed.recipe != current.recipe
    decision = decide(bigger_rank, changed)
    assert decision.retrain and decision.reason.startswith("training settings changed since demo-extractor:production")

    cosmetic = tiny_config.model_copy(deep=True)
    cosmetic.training.logging_steps = 7  # does not change the weights
    assert not decide(cosmetic, current_fingerprints.fn(cosmetic)).retrain


def test_production_without_a_recorded_recipe_compares_data_and_base_only(tiny_config):
    current = current_fingerprints.fn(tiny_config)
    _publish_fake_production(tiny_config, current.model_copy(update={"recipe": None}))
    assert not decide(tiny_config, current.model_copy(update={"recipe": "anything"})).retrain


def test_rejected_data_fails_the_scheduled_run_with_an_event_and_artifact(tiny_config, chat_jsonl, monkeypatch):
    import prefect.artifacts
    import prefect.events

    tables, events = [], []
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", lambda **kw: tables.append(kw))
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: events.append(kw))
    with chat_jsonl.open("a") as fh:  # an empty reply breaks the data contract (no rejected rows allowed)
        fh.write(
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}) + "\n"
        )

    state = scheduled_retrain(tiny_config, return_state=True)

    assert state.is_failed() and "empty_content" in state.message
    assert [t["key"] for t in tables] == ["data-validation"]
    assert [e["event"] for e in events] == ["data.rejected"] and events[0]["payload"]["n_rejected"] == 1
