"""Base-model preparation from a model directory kept in S3 (a user's prefix, written without our markers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3server import moto_server, s3env  # noqa: F401  (fixtures)

from qlora_flow.config import ConfigError
from qlora_flow.store import LocalStore
from tasks.prepare_base import prepare_base_model


def test_s3_model_prefix_is_imported_and_quantized(tiny_config, tiny_model_dir, s3env, tmp_path):
    client = s3env.raw
    for path in Path(tiny_model_dir).iterdir():
        client.upload_file(str(path), s3env.bucket, f"models/tiny/{path.name}")
    cfg = tiny_config
    cfg.base_model.id = f"s3://{s3env.bucket}/models/tiny"
    cfg.execution.s3 = s3env.settings()

    base = prepare_base_model(cfg, LocalStore(cfg.execution.store))

    full = Path(base.full_precision_uri)
    assert (full / "config.json").is_file() and (full / "tokenizer.json").is_file()
    assert base.architecture == "LlamaForCausalLM" and base.nf4_uri is not None
    assert base.parameters == sum(p.numel() for p in _params(tiny_model_dir))


def _params(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).parameters()


def test_unknown_target_module_stops_before_quantizing(tiny_config):
    """A GGUF, hub or S3 base has no weight names to check in preflight: the stage checks lora.target_modules
    against the 16-bit import, so a typo fails in seconds instead of as a traceback of the training child."""
    cfg = tiny_config
    cfg.lora.target_modules = ["q_proj", "q_projj"]
    store = LocalStore(cfg.execution.store)
    with pytest.raises(ConfigError, match=r"lora\.target_modules: 'q_projj' names no linear layer .* q_proj, up_proj"):
        prepare_base_model(cfg, store)
    assert [k for k in store.list("cache/base") if "/nf4-" in k] == []
