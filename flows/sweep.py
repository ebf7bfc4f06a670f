"""A small LoRA-rank sweep: one data validation and base preparation, then one training per rank side
by side on the GPUs of one host (GpuTaskRunner) or of a Ray cluster, selected by execution.runner."""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from flows.pipeline import run_namer, validated_data_and_base
from qlora_flow.config import PipelineConfig
from qlora_flow.console import send_project_logs_to_runs
from qlora_flow.gpu_runner import GPU_TAG, gpu_request, gpu_task_runner, use_leased_gpu
from qlora_flow.preflight import preflight
from qlora_flow.refs import PreparedBase, ValidatedDataset
from qlora_flow.run_config import resolve_and_record
from qlora_flow.store import open_store
from tasks.evaluate import evaluate_adapter
from tasks.train import train_adapter_exclusively


class SweepPoint(BaseModel):
    rank: int
    run_id: str
    adapter_uri: str
    eval_loss: float
    base_loss: float
    train_seconds: float
    cuda_visible_devices: str | None
    started: float
    finished: float


def rank_config(config: PipelineConfig, rank: int) -> PipelineConfig:
    """The config of one sweep point: alpha scales with the rank so alpha/r (the update size) stays fixed."""
    lora = config.lora.model_copy(update={"r": rank, "alpha": config.lora.alpha * rank / config.lora.r})
    return config.model_copy(update={"lora": lora})


@task(name="train-and-evaluate", tags=[GPU_TAG])
def train_candidate(cfg: PipelineConfig, run_id: str, data: ValidatedDataset, base: PreparedBase) -> SweepPoint:
    """Train and evaluate one rank on the GPUs this task was given (CUDA_VISIBLE_DEVICES)."""
    logger = get_run_logger()
    send_project_logs_to_runs()  # this task has a process of its own (GpuTaskRunner)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    use_leased_gpu()  # evaluation runs in this process, whose CUDA was set up before the variable changed
    logger.info("rank %d on CUDA_VISIBLE_DEVICES=%s", cfg.lora.r, devices)
    started = time.time()
    store = open_store(cfg.execution)
    # the pipeline's lock: a point whose rank matches a pipeline run's (or another point's) is the same adapter
    adapter = train_adapter_exclusively(cfg, store, data, base, on_line=logger.info)
    report = evaluate_adapter(cfg, store, run_id, data, base, adapter)
    return SweepPoint(
        rank=cfg.lora.r,
        run_id=run_id,
        adapter_uri=adapter.uri,
        eval_loss=report.tuned_metrics["loss"],
        base_loss=report.base_metrics["loss"],
        train_seconds=adapter.train_seconds,
        cuda_visible_devices=devices,
        started=started,
        finished=time.time(),
    )


# validate_parameters=False: resolve_and_record merges a `config` fragment onto the deployment's config first.
@flow(name="qlora-lora-sweep", flow_run_name=run_namer("sweep"), log_prints=True, validate_parameters=False)
def lora_sweep(
    config: PipelineConfig = PipelineConfig(),
    ranks: list[int] = [4, 8, 16],  # noqa: B006 - never mutated
    overrides: dict[str, Any] = {},  # noqa: B006 - never mutated
) -> list[SweepPoint]:
    """Train one adapter per LoRA rank in parallel on the available GPUs and compare their eval loss.

    `config` may hold only the fields to change (merged onto the deployment's config); `overrides`
    takes dotted keys like the CLI's `--set`."""
    send_project_logs_to_runs()
    config = resolve_and_record(config, overrides)
    ranks = [int(rank) for rank in ranks]
    preflight(config, quick=False)
    data, base = validated_data_and_base(config)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    with gpu_task_runner(config.execution) as runner:
        futures = []
        for rank in ranks:
            cfg = rank_config(config, rank)
            params = {
                "cfg": cfg,
                "run_id": f"{config.publish.model_name}-sweep-{stamp}-r{rank}",
                "data": data,
                "base": base,
            }
            with gpu_request(config.execution, max(cfg.execution.gpus, 1)):
                futures.append(runner.submit(train_candidate, params))
        points = sorted((f.result() for f in futures), key=lambda p: p.eval_loss)
    create_table_artifact(
        [
            {
                "rank": p.rank,
                "eval_loss": round(p.eval_loss, 4),
                "base_loss": round(p.base_loss, 4),
                "train_seconds": p.train_seconds,
                "gpus": p.cuda_visible_devices,
                "adapter": p.adapter_uri,
            }
            for p in points
        ],
        key="lora-sweep",
        description=f"LoRA rank sweep, best first: rank {points[0].rank}",
    )
    return points
