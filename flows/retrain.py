"""Scheduled, incremental retraining: run the pipeline only when the data, the base model or the training
settings changed.

The production alias (`models/<name>/<alias>.json`) names the run it serves; that run's manifest
records the data, base and recipe (LoRA + training + quantization settings) fingerprints it was
trained on; manifests written before recipes were recorded are compared on data and base only.
The current fingerprints come from the same content-addressed stage functions the pipeline uses,
so an unchanged input costs one hash pass and a cache lookup, and a changed one leaves its
validated data and prepared base cached for the training that follows.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Completed, Failed, State
from pydantic import BaseModel

from flows.pipeline import REJECTED, PipelineResult, qlora_pipeline, run_namer
from qlora_flow.config import PipelineConfig
from qlora_flow.layout import MANIFEST_NAME, alias_key, run_key
from qlora_flow.preflight import preflight
from qlora_flow.run_config import resolve_and_record
from qlora_flow.stage_cache import recipe_fingerprint
from qlora_flow.store import ArtifactStore, open_store


class Fingerprints(BaseModel):
    data: str
    base: str
    recipe: str | None = None


class RetrainDecision(BaseModel):
    retrain: bool
    reason: str
    current: Fingerprints
    production_run: str | None = None
    production: Fingerprints | None = None


def production_fingerprints(store: ArtifactStore, model_name: str, alias: str) -> tuple[str, Fingerprints] | None:
    """(run id, fingerprints) the aliased model was trained on; None when nothing is published under the alias."""
    document, _ = store.read_alias(alias_key(model_name, alias))
    if document is None:
        return None
    run_id = document["run_id"]
    lineage = store.read_json(f"{run_key(run_id)}/{MANIFEST_NAME}")["lineage"]
    return run_id, Fingerprints(
        data=lineage["data"]["fingerprint"],
        base=lineage["base_model"]["fingerprint"],
        recipe=lineage.get("recipe", {}).get("fingerprint"),
    )


@task(name="current-fingerprints")
def current_fingerprints(cfg: PipelineConfig) -> Fingerprints:
    from tasks.prepare_base import prepare_base_model
    from tasks.validate import validate_dataset_task

    # the pipeline's wrapper, so that a scheduled run also reports its data (artifact; data.rejected, on failure too)
    data = validate_dataset_task.fn(cfg)
    base = prepare_base_model(cfg, open_store(cfg.execution))
    return Fingerprints(data=data.fingerprint, base=base.fingerprint, recipe=recipe_fingerprint(cfg))


def decide(cfg: PipelineConfig, current: Fingerprints) -> RetrainDecision:
    name, alias = cfg.publish.model_name, cfg.publish.alias
    production = production_fingerprints(open_store(cfg.execution), name, alias)
    if production is None:
        return RetrainDecision(retrain=True, reason=f"no {name}:{alias} model yet", current=current)
    run_id, trained_on = production
    labels = {"data": "data", "base": "base", "recipe": "training settings"}
    changed = [
        labels[part]
        for part in ("data", "base", "recipe")
        if getattr(trained_on, part) is not None and getattr(current, part) != getattr(trained_on, part)
    ]
    reason = (
        f"{' and '.join(changed)} changed since {name}:{alias} (run {run_id}) was trained"
        if changed
        else f"data, base model and training settings unchanged since {name}:{alias} (run {run_id}); nothing to retrain"
    )
    return RetrainDecision(
        retrain=bool(changed), reason=reason, current=current, production_run=run_id, production=trained_on
    )


# validate_parameters=False: resolve_run_config merges a `config` fragment onto the deployment's config first.
@flow(name="qlora-retrain", flow_run_name=run_namer("retrain"), log_prints=True, validate_parameters=False)
def scheduled_retrain(
    config: PipelineConfig = PipelineConfig(),
    overrides: dict[str, Any] = {},  # noqa: B006 - never mutated
) -> PipelineResult | State:
    """Retrain and publish when the data, base model or training settings differ from production's.

    `config` may hold only the fields to change (merged onto the deployment's config); `overrides`
    sets dotted keys on top, e.g. {"training.max_steps": 10}."""
    logger = get_run_logger()
    config = resolve_and_record(config, overrides)
    preflight(config, quick=False)
    decision = decide(config, current_fingerprints(config))
    logger.info(decision.reason)
    if not decision.retrain:
        # A skipped retraining completes under its own state name, visible in the runs list.
        return Completed(name="Unchanged", message=decision.reason, data=decision)
    outcome = qlora_pipeline(config, return_state=True)
    if outcome.name == REJECTED:
        # a rejected candidate leaves this run Rejected too, not Completed (a returned subflow state would
        # only count as a plain "Failed", so the state is made here)
        return Failed(name=REJECTED, message=outcome.message, data=outcome.result(raise_on_failure=False))
    return outcome.result()
