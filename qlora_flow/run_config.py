"""The config a flow run uses.

A deployed run starts from the config stored on its deployment. The run's `config` parameter (a
whole config, as the UI's form sends it, or only the sections and fields to change, as
`prefect deployment run ... -p config='{"training":{"max_steps":10}}'` sends it) is merged onto
it field by field, then `overrides` (dotted keys, like `qlora-flow run --set`) are set on top.
Prefect's server merges run parameters into deployment parameters one level deep only, so without
this a fragment would replace the deployment's whole config and the run would get the defaults.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import deployment, flow_run
from pydantic import BaseModel

from qlora_flow.config import ConfigError, PipelineConfig, apply_overrides, validate_config


@dataclass
class ResolvedConfig:
    config: PipelineConfig
    base: str  # what the run started from: "deployment <flow>/<name>'s config", "the config passed in", "the defaults"
    changed: dict[str, Any]  # dotted key -> value, where the run's config differs from that base


def _section(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    field = model.model_fields.get(key)
    annotation = field.annotation if field is not None else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def merge_config(base: dict, update: dict, model: type[BaseModel] = PipelineConfig) -> dict:
    """update's fields replace base's; config sections merge field by field. Fields whose value is a
    mapping or list (data.column_mapping, lora.target_modules) are values, replaced whole."""
    merged = dict(base)
    for key, value in update.items():
        section = _section(model, key)
        if section and isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge_config(base[key], value, section)
        else:
            merged[key] = value
    return merged


def deployment_config() -> tuple[str, dict] | None:
    """(name, config) stored on the deployment this flow run was created from; None outside a deployment."""
    deployment_id = deployment.id
    if deployment_id is None:
        return None
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    return f"{flow_run.flow_name}/{stored.name}", stored.parameters.get("config") or {}


def _flatten(document: dict, model: type[BaseModel] = PipelineConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of every field, e.g. {"training.max_steps": 10}."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        section = _section(model, key)
        if section and isinstance(value, dict):
            flat |= _flatten(value, section, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_run_config(config: PipelineConfig | dict | None, overrides: dict | None = None) -> ResolvedConfig:
    """The run's validated config. A PipelineConfig instance is complete (an in-process caller built
    it); a mapping is merged onto the deployment's config. Errors are load_config's one line per field."""
    if isinstance(config, PipelineConfig):
        base_name, base, raw = "the config passed in", config.model_dump(mode="json"), config.model_dump(mode="json")
    elif config is None or isinstance(config, dict):
        found = deployment_config()
        base_name, base = (f"deployment {found[0]}'s config", found[1]) if found else ("the defaults", {})
        # a copy: apply_overrides edits it in place, and must not edit base or the caller's dict
        raw = copy.deepcopy(merge_config(base, config or {}))
    else:
        raise ConfigError(f"config: expected a mapping of config sections, got {type(config).__name__} {config!r}")
    if not isinstance(overrides or {}, dict):
        raise ConfigError(
            f'overrides: expected a mapping of dotted keys to values, e.g. {{"training.max_steps": 10}}, '
            f"got {overrides!r}"
        )
    resolved = validate_config(apply_overrides(raw, dict(overrides or {})), f"the run's parameters over {base_name}")
    try:
        before = _flatten(PipelineConfig.model_validate(base).model_dump(mode="json"))
    except ValueError:
        before = _flatten(base)  # a deployment registered before a config change: compare what it stored
    after = _flatten(resolved.model_dump(mode="json"))
    changed = {key: value for key, value in after.items() if key not in before or before[key] != value}
    return ResolvedConfig(config=resolved, base=base_name, changed=changed)


def describe(resolved: ResolvedConfig) -> str:
    if not resolved.changed:
        return f"config: {resolved.base}, unchanged"
    changes = ", ".join(f"{key}={value!r}" for key, value in sorted(resolved.changed.items()))
    return f"config: {resolved.base}, changed: {changes}"


def resolve_and_record(config: PipelineConfig | dict | None, overrides: dict | None) -> PipelineConfig:
    """A flow's first step: resolve its config, log what differs from the deployment's, and keep the
    whole config as a `resolved-config` artifact (the run's parameters may hold only a fragment)."""
    resolved = resolve_run_config(config, overrides)
    summary = describe(resolved)
    get_run_logger().info(summary)
    document = yaml.safe_dump(resolved.config.model_dump(mode="json"), sort_keys=False)
    create_markdown_artifact(
        key="resolved-config",
        markdown=f"## Config of this run\n\n{summary}\n\n```yaml\n{document}```\n",
        description=summary[:500],
    )
    return resolved.config
