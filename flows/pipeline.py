"""The QLoRA pipeline flow: it wires the six stages together and decides; the work happens in tasks/."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from pydantic import BaseModel

from qlora_flow.config import ConfigError, PipelineConfig
from qlora_flow.console import send_project_logs_to_runs
from qlora_flow.gpu_runner import flow_gpu_lease
from qlora_flow.hardware import resolve_device
from qlora_flow.layout import CLAIM_NAME, MANIFEST_NAME, run_key
from qlora_flow.preflight import preflight
from qlora_flow.refs import (
    AdapterRef,
    EvalReport,
    GgufExport,
    MergedModel,
    PreparedBase,
    PublishedModel,
    ValidatedDataset,
)
from qlora_flow.run_config import resolve_and_record, resolve_run_config
from qlora_flow.store import ArtifactStore, open_store
from tasks.evaluate import evaluate_task
from tasks.export_gguf import export_gguf_task
from tasks.merge import merge_task
from tasks.prepare_base import prepare_base_model_task
from tasks.publish import publish_task
from tasks.train import train_adapter_task
from tasks.validate import validate_dataset_task

REJECTED = "Rejected"  # state name of a run whose candidate the quality gate rejected


class PipelineResult(BaseModel):
    run_id: str
    status: Literal["published", "merged", "rejected", "unchanged"]
    message: str
    data: ValidatedDataset
    base: PreparedBase
    adapter: AdapterRef
    report: EvalReport
    merged: MergedModel | None = None
    gguf: GgufExport | None = None
    published: PublishedModel | None = None


class CandidateRejected(Exception):
    """The data of a Rejected state: the quality gate's reasons as its message, the full result as `result`.

    Prefect resolves a failed state's data into an exception wherever the state's result is asked for (the
    engine a worker starts does so after every run and logs what it got): a plain result there became
    `TypeError: Unexpected result for failed state` in the run's log, read as a crash."""

    def __init__(self, result: PipelineResult):
        super().__init__(result.message)
        self.result = result

    def __reduce__(self):  # pickled with the state's data; the default would call __init__ with the message
        return CandidateRejected, (self.result,)


def run_namer(kind: str = "") -> Callable[[], str]:
    """Flow-run names that say what runs: `[kind ]model | data | date` (UTC), from the run's resolved config."""

    def name() -> str:
        params = flow_run.parameters
        try:
            cfg = resolve_run_config(params.get("config"), params.get("overrides")).config
            model, data_name = cfg.publish.model_name, Path(cfg.data.train_path).stem
        except ConfigError:  # the flow body fails with the reason
            model, data_name = "invalid config", "-"
        prefix = f"{kind} " if kind else ""
        return f"{prefix}{model} | {data_name} | {datetime.now(timezone.utc):%Y-%m-%d %H:%M}"

    return name


def _run_id(cfg: PipelineConfig) -> str:
    if cfg.execution.run_name:
        return cfg.execution.run_name
    suffix = (flow_run.get_id() or "local")[:8]
    return f"{cfg.publish.model_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{suffix}"


def claim_run_id(store: ArtifactStore, run_id: str) -> None:
    """Refuse a run id that another flow run already merged or published under (a fixed
    execution.run_name): merging again would delete that run's model, and publish would hand back
    that run's recorded result. A retry of the same flow run finds its own claim and carries on."""
    run = run_key(run_id)
    claim, mine = f"{run}/{CLAIM_NAME}", flow_run.get_id()
    finished = store.exists(f"{run}/{MANIFEST_NAME}") or store.is_complete(f"{run}/model")
    if finished and not (mine and store.exists(claim) and store.read_json(claim).get("flow_run_id") == mine):
        raise ConfigError(
            f"execution.run_name: run id {run_id!r} already has a finished run at {store.uri(run)}; leave "
            "execution.run_name empty for a fresh id per run, or set a new one"
        )
    store.write_json(claim, {"flow_run_id": mine})


# Parameters are validated by resolve_run_config, not by Prefect: a `config` fragment must be merged
# onto the deployment's config before validation, or PipelineConfig's defaults would fill the rest.
@flow(name="qlora-finetune", flow_run_name=run_namer(), log_prints=True, validate_parameters=False)
def qlora_pipeline(
    config: PipelineConfig = PipelineConfig(),
    overrides: dict[str, Any] = {},  # noqa: B006 - never mutated
) -> PipelineResult:
    """Validate data, quantize the base, train a LoRA adapter, evaluate, merge and publish.

    `config` may hold only the fields to change (merged onto the deployment's config); `overrides`
    sets dotted keys on top, e.g. {"training.max_steps": 10}."""
    send_project_logs_to_runs()
    logger = get_run_logger()
    config = resolve_and_record(config, overrides)
    preflight(config, quick=False)  # a config that cannot work fails here, before any stage or task retry
    run_id = _run_id(config)
    claim_run_id(open_store(config.execution), run_id)  # before any stage writes under the run id
    logger.info("run %s: base %s, data %s", run_id, config.base_model.id, config.data.train_path)
    with flow_gpu_lease(config.execution, resolve_device(config.execution.device)) as gpus:
        if gpus is not None:
            logger.info(
                "run %s holds GPUs %s of this host (CUDA_VISIBLE_DEVICES=%s)",
                run_id,
                gpus,
                os.environ["CUDA_VISIBLE_DEVICES"],
            )
        return _stages(config, run_id, logger)


# How long base preparation waits for data validation before starting beside it.
BASE_HEAD_START_S = 10.0


def validated_data_and_base(config: PipelineConfig) -> tuple[ValidatedDataset, PreparedBase]:
    """Validate the data and prepare the base, which do not depend on each other.

    A flow cannot stop a stage running in one of its threads: started together, bad data would fail only
    once the base was downloaded and quantized (minutes on a first run). Validation usually ends within
    BASE_HEAD_START_S, so the base starts after it (at most that much later: a cached base takes a second or
    two anyway); a longer validation (a large dataset) runs beside the base preparation as before."""
    data_future = validate_dataset_task.submit(config)
    done, _ = wait([data_future], timeout=BASE_HEAD_START_S)
    data = data_future.result() if done else None  # raises at once for bad data
    base = prepare_base_model_task.submit(config).result()
    return (data if data is not None else data_future.result()), base


def _stages(config: PipelineConfig, run_id: str, logger) -> PipelineResult | State:
    data, base = validated_data_and_base(config)

    adapter = train_adapter_task(config, data, base)
    report = evaluate_task(config, run_id, data, base, adapter)
    result = PipelineResult(
        run_id=run_id, status="rejected", message="", data=data, base=base, adapter=adapter, report=report
    )
    if not report.verdict.passed:
        result.message = "quality gate failed: " + "; ".join(report.verdict.reasons)
        logger.warning(result.message)
        # Failed-type, so the runs list shows it red and `prefect flow-run ls` FAILED: no model came out of
        # it and someone has to look. Its name tells it from a crash; its data carries the full result.
        return Failed(name=REJECTED, message=result.message, data=CandidateRejected(result))

    result.merged = merge_task(config, run_id, base, adapter, report, data)
    if config.export.gguf:
        result.gguf = export_gguf_task(config, result.merged, data)
    if not config.publish.enabled:
        result.status, result.message = "merged", f"merged model at {result.merged.uri} (publishing disabled)"
        return result
    result.published = publish_task(
        config,
        open_store(config.execution),
        run_id,
        merged=result.merged,
        adapter=adapter,
        report=report,
        data=data,
        base=base,
        gguf=result.gguf,
    )
    if result.published.same_as_run:
        # Every stage was a cache hit and the alias already serves this model: the run completes as Unchanged,
        # like a scheduled retraining that found nothing to do (flows/retrain.py).
        result.status = "unchanged"
        result.message = (
            f"{config.publish.model_name}:{config.publish.alias} already serves this model with these results "
            f"(run {result.published.same_as_run}); no model copied, run {run_id} recorded at {result.published.run_uri}"
        )
        logger.info(result.message)
        return Completed(name="Unchanged", message=result.message, data=result)
    result.status = "published"
    result.message = f"published {config.publish.model_name} run {run_id}: {result.published.manifest_uri}"
    logger.info(result.message)
    return result
