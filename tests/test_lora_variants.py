"""LoRA variants (DoRA, rsLoRA): trained on the NF4 tiny model, in the fingerprints, merged and verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qlora_flow.config import ConfigError, load_config
from qlora_flow.stage_cache import recipe_fingerprint
from qlora_flow.store import LocalStore
from tasks.merge import merge_adapter
from tasks.prepare_base import prepare_base_model
from tasks.train import train_adapter, training_fingerprint
from tasks.validate import validate_dataset


def test_variants_change_the_recipe_but_plain_lora_keeps_its_fingerprint(tiny_config):
    plain = recipe_fingerprint(tiny_config)
    # the recipe of plain LoRA trained by TRL as computed before the variant fields and training.backend existed
    from qlora_flow.fingerprint import combine
    from qlora_flow.stage_cache import _NON_RESULT_TRAINING_FIELDS

    lora = tiny_config.lora.model_dump(mode="json", exclude={"use_dora", "use_rslora", "init"})
    training = tiny_config.training.model_dump(mode="json", exclude=_NON_RESULT_TRAINING_FIELDS | {"backend"})
    assert plain == combine("recipe", lora, training, tiny_config.quantization)
    seen = {plain}
    for field, value in (("use_dora", True), ("use_rslora", True), ("init", "gaussian")):
        cfg = tiny_config.model_copy(deep=True)
        setattr(cfg.lora, field, value)
        seen.add(recipe_fingerprint(cfg))
    assert len(seen) == 4


def test_pissa_and_loftq_are_rejected_with_the_reason():
    with pytest.raises(ConfigError, match="lora.init"):
        load_config(None, {"lora.init": "pissa"})


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import TOKENIZER_DIR
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.mark.slow  # a training each: ~50 s on a loaded 2-core box
@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
def test_variant_trains_on_nf4_merges_and_verifies(variant, tiny_config, tokenizer):
    cfg = tiny_config.model_copy(deep=True)
    setattr(cfg.lora, variant, True)
    store = LocalStore(cfg.execution.store)
    data = validate_dataset(cfg, store, tokenizer)
    base = prepare_base_model(cfg, store)
    adapter = train_adapter(cfg, store, data, base)
    assert adapter.fingerprint == training_fingerprint(cfg, data, base)

    adapter_dir = Path(adapter.uri)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())[variant] is True
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if "lora_magnitude_vector" in k]
    assert bool(magnitudes) == (variant == "use_dora")  # DoRA's learned magnitude per output feature is saved

    merged = merge_adapter(cfg, store, f"run-{variant}", base, adapter, data=data)
    v = merged.verification
    assert v["verified"] is True and v["reloaded_greedy_mismatches"] == 0
    assert v["reloaded_max_abs_logit_diff"] <= v["logits_atol"]
    print(f"{variant}: merge verification {json.dumps(v, sort_keys=True)}")
    card = (Path(merged.uri) / "README.md").read_text()
    assert f"{variant}: true" in card
