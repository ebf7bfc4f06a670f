"""Register qlora-flow's work pools, deployments and automation with the Prefect server in PREFECT_API_URL.

    python -m deployments.deploy [--config configs/demo.yaml] [--set KEY=VALUE ...] [--k8s-image IMAGE]

Deployments (parameters default to the config file; the UI shows them as a typed form built from
PipelineConfig's schema):
  qlora-finetune/manual        click "Run" (or trigger through the API or `prefect deployment run`);
                               a `config` fragment or dotted `overrides` apply on top of this config
  qlora-retrain/scheduled      cron + timezone from the config's `schedule` section; a no-op
                               when data and base are what production was trained on
  qlora-lora-sweep/manual      LoRA ranks side by side on this host's GPUs (or Ray)
Each allows one run at a time, so a model never trains twice at once; a scheduled run that finds
the previous one still going is cancelled rather than queued, so schedules cannot pile up.

Work pools: `qlora-local` (process worker on this machine). With --k8s-image, also `qlora-k8s`
(Kubernetes; infra/k8s/base-job-template.json requests GPUs) and the same deployments on it,
run from the image built with infra/Dockerfile.gpu; then only the k8s scheduled deployment's cron
is active, so retraining runs once a night (on the GPU cluster).

Registering again is safe: a deployment keeps its paused state (a rejection may have paused the
schedule) and an existing pool gets the current base job template.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from uuid import UUID

import yaml
from prefect import Flow
from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment, deploy
from prefect.events.actions import PauseDeployment
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.workers.process import ProcessWorker

from qlora_flow.config import PipelineConfig, load_config, override_keys
from qlora_flow.model_events import ALIAS_LABEL, model_resource

ROOT = Path(__file__).resolve().parent.parent
K8S_TEMPLATE = ROOT / "infra" / "k8s" / "base-job-template.json"
IMAGE_WORKDIR = Path("/opt/qlora-flow")  # infra/Dockerfile.gpu's WORKDIR: where flow runs in the image start
PROCESS_POOL = "qlora-local"
K8S_POOL = "qlora-k8s"
ENTRYPOINTS = {
    "pipeline": "flows/pipeline.py:qlora_pipeline",
    "retrain": "flows/retrain.py:scheduled_retrain",
    "sweep": "flows/sweep.py:lora_sweep",
}
MANUAL, SCHEDULED, SWEEP = "qlora-finetune/manual", "qlora-retrain/scheduled", "qlora-lora-sweep/manual"


def _flow(kind: str, for_image: bool) -> Flow:
    if for_image:
        # Code is baked into the image (WORKDIR /opt/qlora-flow); the entrypoint resolves from there.
        from prefect.flows import load_flow_from_entrypoint

        return load_flow_from_entrypoint(str(ROOT / ENTRYPOINTS[kind]))
    # Process workers run the flow from this checkout (pull step: set the working directory here).
    return Flow.from_source(source=str(ROOT), entrypoint=ENTRYPOINTS[kind])


def build_deployments(cfg: PipelineConfig, for_image: bool = False, schedule: bool = True) -> list[RunnerDeployment]:
    """schedule=False leaves the scheduled deployment's cron inactive (another pool's variant runs it)."""
    params = {"config": cfg.model_dump(mode="json")}
    model = cfg.publish.model_name
    tags = ["qlora", f"model:{model}"]
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    common = dict(parameters=params, tags=tags, version=None)
    deployments = [
        _flow("pipeline", for_image).to_deployment(
            name="manual",
            concurrency_limit=one_at_a_time,
            description=f"Fine-tune and publish {model} on demand; edit the config in the Run form.",
            **common,
        ),
        _flow("retrain", for_image).to_deployment(
            name="scheduled",
            schedules=[
                Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone, active=cfg.schedule.active and schedule)
            ],
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            description=f"Retrain {model} when its data or base model changed ({cfg.schedule.cron}, {cfg.schedule.timezone}).",
            **{**common, "tags": tags + ["scheduled"]},
        ),
        _flow("sweep", for_image).to_deployment(
            name="manual",
            concurrency_limit=one_at_a_time,
            description="LoRA ranks trained side by side, one per GPU.",
            **common,
        ),
    ]
    return deployments


def ensure_work_pool(name: str, pool_type: str, base_job_template: dict) -> None:
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=base_job_template))
            return
        # edits to infra/k8s/base-job-template.json must reach a pool created by an earlier registration
        if pool.base_job_template != base_job_template:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=base_job_template))


def keep_paused_state(deployments: list[RunnerDeployment]) -> list[RunnerDeployment]:
    """Carry each existing deployment's paused state over: applying sends `paused`, False when unset
    (Prefect's reconcile_paused_deployment), which would resume a schedule the rejection automation paused."""
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            try:
                deployment.paused = client.read_deployment_by_name(deployment.full_name).paused
            except ObjectNotFound:
                pass  # new deployment: created unpaused
    return deployments


def override_key_names() -> dict:
    """JSON schema of the keys `overrides` accepts (qlora_flow/config.py's `override_keys`)."""
    keys, mappings = override_keys()
    mapping_children = "|".join(re.escape(mapping) for mapping in mappings)
    return {"anyOf": [{"enum": keys}, {"pattern": rf"^(?:{mapping_children})\..+$"}]}


def complete_parameter_schema(deployment_ids: list[UUID], cfg: PipelineConfig) -> None:
    """Prefect builds the parameter schema from the flow's signature. Two things it cannot know:
    - the Run form's defaults (PipelineConfig()'s there): made the config this deployment runs with;
    - which dotted keys `overrides` takes (a dict[str, Any] there): named, so that a misspelt key is refused
      when the run is created (`prefect deployment run` prints `Validation failed for field 'overrides'.
      Failure reason: 'training.max_stepz' is not valid under any of the given schemas`) instead of failing
      when the run starts, which with one run at a time can be hours later, behind a training."""
    with get_client(sync_client=True) as client:
        for deployment_id in deployment_ids:
            schema = client.read_deployment(deployment_id).parameter_openapi_schema
            schema["properties"]["config"]["default"] = cfg.model_dump(mode="json")
            schema["properties"]["overrides"]["propertyNames"] = override_key_names()
            client.update_deployment(deployment_id, DeploymentUpdate(parameter_openapi_schema=schema))


def ensure_pause_on_rejection(cfg: PipelineConfig, scheduled_ids: list[UUID], workdirs: list[Path]) -> Automation:
    """When a candidate that would have moved the scheduled deployment's alias fails the quality gate,
    pause scheduled retraining (on every pool) until someone looks. Rejected experiments that publish
    elsewhere (another alias or store, or publishing off) leave the schedule alone. `workdirs`: where
    the deployments' flow runs resolve a relative local store."""
    model = cfg.publish.model_name
    resources = {model_resource(cfg, workdir)["prefect.resource.id"] for workdir in workdirs}
    name = f"pause retraining of {model} on model.rejected"
    try:
        Automation.read(name=name).delete()
    except ValueError:
        pass  # first registration
    return Automation(
        name=name,
        description="A rejected model stops the schedule; resume the deployment after fixing data or config.",
        trigger=EventTrigger(
            expect={"model.rejected"},
            match={"prefect.resource.id": sorted(resources), ALIAS_LABEL: cfg.publish.alias},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[PauseDeployment(source="selected", deployment_id=i) for i in scheduled_ids],
    ).create()


def register(cfg: PipelineConfig, k8s_image: str | None = None) -> dict[str, UUID]:
    """Create pools, deployments and the automation; returns deployment ids by full name."""
    ensure_work_pool(PROCESS_POOL, "process", ProcessWorker.get_default_base_job_template())
    names = [MANUAL, SCHEDULED, SWEEP]
    # With the k8s pool the cron runs there only (GPU cluster); the local variant stays for manual runs.
    local = keep_paused_state(build_deployments(cfg, schedule=not k8s_image))
    ids = dict(
        zip(names, deploy(*local, work_pool_name=PROCESS_POOL, build=False, push=False, print_next_steps_message=False))
    )
    if k8s_image:
        import json

        ensure_work_pool(K8S_POOL, "kubernetes", json.loads(K8S_TEMPLATE.read_text()))
        k8s = build_deployments(cfg, for_image=True)
        for deployment in k8s:
            deployment.name = f"{deployment.name}-k8s"
        k8s_ids = deploy(
            *keep_paused_state(k8s),
            work_pool_name=K8S_POOL,
            image=k8s_image,
            build=False,
            push=False,
            print_next_steps_message=False,
        )
        ids |= {f"{n}-k8s": i for n, i in zip(names, k8s_ids)}
    complete_parameter_schema(list(ids.values()), cfg)
    scheduled = [i for n, i in ids.items() if n.startswith(SCHEDULED)]
    ensure_pause_on_rejection(cfg, scheduled, [ROOT, IMAGE_WORKDIR] if k8s_image else [ROOT])
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="pipeline config YAML")
    parser.add_argument("--k8s-image", help="also register the Kubernetes pool and deployments using this image")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set execution.store=s3://bucket/prefix",
    )
    args = parser.parse_args(argv)
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    for name, deployment_id in register(load_config(args.config, overrides), args.k8s_image).items():
        print(f"{name}\t{deployment_id}")


if __name__ == "__main__":
    main()
