"""Resolving a run's config: a `config` fragment merges onto the deployment's config field by field,
dotted `overrides` go on top, and mistakes are load_config's one line per field."""

from __future__ import annotations

import pytest

from qlora_flow import run_config
from qlora_flow.config import ConfigError, PipelineConfig
from qlora_flow.run_config import describe, merge_config, resolve_run_config

DEPLOYED = {
    "data": {"train_path": "data/train.jsonl", "column_mapping": {"q": "prompt", "a": "completion"}},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    "training": {"max_seq_length": 256, "max_steps": 40},
    "publish": {"model_name": "orders"},
}


@pytest.fixture
def deployed(monkeypatch):
    monkeypatch.setattr(run_config, "deployment_config", lambda: ("qlora-finetune/manual", DEPLOYED))


def test_fragment_and_overrides_apply_on_the_deployment_config(deployed):
    fragment = {"training": {"max_steps": 10}}
    resolved = resolve_run_config(fragment, {"lora.r": 8, "evaluation.gate.min_exact_match": 0.5})
    cfg = resolved.config
    assert (cfg.training.max_steps, cfg.lora.r, cfg.evaluation.gate.min_exact_match) == (10, 8, 0.5)
    # everything else is the deployment's, not PipelineConfig's defaults (512, 0.05, demo-extractor)
    assert (cfg.training.max_seq_length, cfg.lora.dropout, cfg.publish.model_name) == (256, 0.0, "orders")
    assert resolved.changed == {"training.max_steps": 10, "lora.r": 8, "evaluation.gate.min_exact_match": 0.5}
    assert describe(resolved) == (
        "config: deployment qlora-finetune/manual's config, changed: "
        "evaluation.gate.min_exact_match=0.5, lora.r=8, training.max_steps=10"
    )
    assert DEPLOYED["lora"]["r"] == 16 and fragment == {"training": {"max_steps": 10}}  # inputs untouched


def test_a_full_config_from_the_run_form_wins_and_mapping_fields_are_replaced_whole(deployed):
    form = PipelineConfig.model_validate(DEPLOYED).model_dump(mode="json")
    form["data"]["column_mapping"] = {"question": "prompt"}
    form["lora"]["r"] = 4
    cfg = resolve_run_config(form).config
    assert cfg.data.column_mapping == {"question": "prompt"} and cfg.lora.r == 4
    assert resolve_run_config(None).changed == {}  # a quick run: the deployment's config as it is


def test_bad_keys_and_values_are_named_on_one_line(deployed):
    with pytest.raises(ConfigError) as bad_key:
        resolve_run_config({}, {"training.max_step": 10})
    assert str(bad_key.value) == (
        "invalid configuration in the run's parameters over deployment qlora-finetune/manual's config: "
        "training.max_step: unknown key (did you mean training.max_steps?); "
        "check the spelling against configs/default.yaml"
    )
    with pytest.raises(ConfigError, match=r"lora\.r: Input should be greater than 0 \(got 0\)"):
        resolve_run_config({"lora": {"r": 0}})
    with pytest.raises(ConfigError, match=r"^training\.max_steps\.x: training\.max_steps is a value, not a section"):
        resolve_run_config({}, {"training.max_steps.x": 1})
    with pytest.raises(ConfigError, match=r"^config: expected a mapping of config sections, got str"):
        resolve_run_config("training.max_steps=10")
    with pytest.raises(ConfigError, match=r"^overrides: expected a mapping of dotted keys"):
        resolve_run_config({}, ["training.max_steps=10"])


def test_a_config_object_is_complete_and_outside_a_deployment_defaults_are_the_base():
    cfg = PipelineConfig.model_validate(DEPLOYED)
    resolved = resolve_run_config(cfg, {"training.max_steps": 5})
    assert resolved.config.training.max_seq_length == 256 and resolved.changed == {"training.max_steps": 5}
    outside = resolve_run_config({"training": {"max_steps": 5}})  # no flow run, no deployment
    assert outside.base == "the defaults" and outside.config.training.max_seq_length == 512


def test_merge_recurses_into_sections_only():
    merged = merge_config({"data": {"column_mapping": {"a": "b"}, "split_seed": 1}}, {"data": {"column_mapping": {}}})
    assert merged == {"data": {"column_mapping": {}, "split_seed": 1}}
