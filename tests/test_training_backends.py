"""The training backend switch: `training.backend` picks the module that trains, the default keeps every
fingerprint it had before the switch existed, and a second backend is one module plus one registry entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import placeholder_refs

from qlora_flow.config import ConfigError, PipelineConfig, load_config
from qlora_flow.fingerprint import code_version, combine, library_versions
from qlora_flow.layout import adapter_checkpoints_key
from qlora_flow.stage_cache import recipe_fingerprint
from qlora_flow.store import LocalStore
from qlora_flow.training_backends import TRAINING_BACKENDS, backend_code_modules
from qlora_flow.training_plan import resolve_packing
from tasks.evaluate import evaluate_adapter
from tasks.prepare_base import prepare_base_model
from tasks.train import train_adapter, training_fingerprint
from tasks.validate import validate_dataset

# recipe_fingerprint(PipelineConfig()) computed before `training.backend` existed. It hashes settings only (no
# code, no library versions), so it moves only when a default that changes the result moves.
DEFAULT_RECIPE_FINGERPRINT = "84cff49ee7029a13e1aafcea8b982d14e824b9acdc8a695deaeba83739cf30cd"

DATA, BASE = placeholder_refs()


def test_the_default_backend_keeps_the_fingerprints_of_cached_adapters():
    cfg = PipelineConfig()
    assert cfg.training.backend == "trl"
    assert recipe_fingerprint(cfg) == DEFAULT_RECIPE_FINGERPRINT
    # the adapter fingerprint as tasks/train.py computed it before the switch: recipe.py among the hashed modules
    # (and since the fused LoRA update, qlora_flow/fused_lora.py: a code change its lineage entry declares)
    old_formula = combine(
        "adapter",
        DATA.fingerprint,
        BASE.fingerprint,
        DEFAULT_RECIPE_FINGERPRINT,
        {"packed": resolve_packing(cfg.training.packing, BASE.device)},
        code_version(
            "qlora_flow.recipe",
            "qlora_flow.models",
            "qlora_flow.hardware",
            "qlora_flow.training_plan",
            "qlora_flow.training_template",
            "qlora_flow.fused_lora",
        ),
        library_versions(),
    )
    assert training_fingerprint(cfg, DATA, BASE) == old_formula


@pytest.mark.parametrize("name", ["unsloth", "TRL", ""])
def test_an_unknown_backend_is_one_line_naming_the_field_and_the_known_ones(name):
    with pytest.raises(ConfigError) as info:
        load_config(None, {"training.backend": name})
    message = str(info.value)
    assert f"training.backend: unknown backend {name!r}; known: trl" in message
    assert "\n" not in message


@pytest.fixture
def fake_backend(monkeypatch) -> str:
    """tests/fake_training_backend.py registered as `fake`: the one entry a second backend adds."""
    monkeypatch.setitem(TRAINING_BACKENDS, "fake", "tests.fake_training_backend")
    return "fake"


def test_a_registered_backend_is_accepted_and_names_its_module_in_the_fingerprint(fake_backend):
    cfg = load_config(None, {"training.backend": fake_backend})
    assert backend_code_modules(fake_backend) == ("qlora_flow.recipe", "tests.fake_training_backend")
    assert backend_code_modules("trl") == ("qlora_flow.recipe",)
    assert recipe_fingerprint(cfg) != DEFAULT_RECIPE_FINGERPRINT
    assert training_fingerprint(cfg, DATA, BASE) != training_fingerprint(PipelineConfig(), DATA, BASE)


def test_the_stage_trains_with_the_selected_backend_and_its_adapter_flows_on(tiny_config, fake_backend):
    from conftest import TOKENIZER_DIR
    from transformers import AutoTokenizer

    cfg = tiny_config.model_copy(deep=True)
    cfg.training.backend = fake_backend
    store = LocalStore(cfg.execution.store)
    data = validate_dataset(cfg, store, AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    base = prepare_base_model(cfg, store)

    adapter = train_adapter(cfg, store, data, base)

    # the fake's statistics (zero steps), not TRL's six, and its checkpoint committed by the stage
    assert (adapter.steps, adapter.loss_history, adapter.tokens_seen) == (0, [], 0)
    assert store.verified(f"{adapter_checkpoints_key(adapter.fingerprint)}/checkpoint-0") is not None
    assert adapter.fingerprint == training_fingerprint(cfg, data, base)
    assert adapter.fingerprint != training_fingerprint(tiny_config, data, base)
    adapter_dir = Path(adapter.uri)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == cfg.lora.r
    assert adapter.trainable_parameters > 0
    assert train_adapter(cfg, store, data, base) == adapter  # stored under its own fingerprint: a repeat reuses it

    # evaluation loads it onto the base; an untrained adapter (lora_B = 0) scores exactly like the base
    report = evaluate_adapter(cfg, store, "run-fake", data, base, adapter)
    assert report.base_metrics and report.tuned_metrics == pytest.approx(report.base_metrics)
