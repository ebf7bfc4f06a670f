"""Registering twice (scripts/local_stack.sh does it on every start) against a temporary Prefect server:
one active schedule, a pause that survives, pools that follow their template file."""

from __future__ import annotations

import json

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolUpdate

from deployments.deploy import IMAGE_WORKDIR, K8S_POOL, K8S_TEMPLATE, MANUAL, ROOT, SCHEDULED, register
from qlora_flow.config import load_config
from qlora_flow.model_events import model_resource

K8S_IMAGE = "registry.example.com/qlora-flow-gpu:test"


def test_register_again_keeps_pause_one_active_schedule_and_updates_pool(prefect_api):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    ids = register(cfg, k8s_image=K8S_IMAGE)
    scheduled = [ids[SCHEDULED], ids[f"{SCHEDULED}-k8s"]]
    with get_client(sync_client=True) as client:
        # retraining runs once a night, on the k8s pool; the local variant's cron is off
        active = {i: [s.active for s in client.read_deployment(i).schedules] for i in scheduled}
        assert active == {ids[SCHEDULED]: [False], ids[f"{SCHEDULED}-k8s"]: [True]}
        # what the rejection automation does, to both; and a hand edit of the k8s pool
        for i in scheduled:
            client.update_deployment(i, DeploymentUpdate(paused=True))
        edited = json.loads(K8S_TEMPLATE.read_text())
        edited["variables"]["properties"]["gpus"]["default"] = 99
        client.update_work_pool(K8S_POOL, WorkPoolUpdate(base_job_template=edited))

    assert register(cfg, k8s_image=K8S_IMAGE) == ids
    with get_client(sync_client=True) as client:
        assert all(client.read_deployment(i).paused for i in scheduled)
        assert not client.read_deployment(ids[MANUAL]).paused
        assert client.read_work_pool(K8S_POOL).base_job_template == json.loads(K8S_TEMPLATE.read_text())
    automation = Automation.read(name=f"pause retraining of {cfg.publish.model_name} on model.rejected")
    assert sorted(str(a.deployment_id) for a in automation.actions) == sorted(map(str, scheduled))
    # only rejections of this model in this store (as the local and the k8s runs see it) that would move its alias
    stores = {model_resource(cfg, workdir)["prefect.resource.id"] for workdir in (ROOT, IMAGE_WORKDIR)}
    assert set(automation.trigger.match["prefect.resource.id"]) == stores
    assert automation.trigger.match["qlora-flow.alias"] == ["production"]
