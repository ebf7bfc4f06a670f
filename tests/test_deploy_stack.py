"""End to end on a real local stack: `prefect server start` (SQLite) on loopback, the deployments from
deployments/, a process worker running the tiny model, and the Prefect UI in headless Chromium.

Tests share one server and run in file order: registration, the concurrency limits (before a worker
exists), a manual run with a parameter override, the scheduled no-op, the UI, the automation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest
from conftest import CHROMIUM, build_tiny_model_dir, launch_chromium, make_chat_rows, tiny_overrides
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
from prefect.states import Cancelled, Pending

from deployments.deploy import K8S_POOL, MANUAL, PROCESS_POOL, ROOT, SCHEDULED, SWEEP, register
from deployments.local import api_of, free_port, prefect_server, process_worker
from qlora_flow.config import PipelineConfig, load_config
from qlora_flow.model_events import model_resource

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "demo-order-extractor"  # the demo config's model: the deployments are registered for it
K8S_IMAGE = "registry.example.com/qlora-flow-gpu:test"
SCREENSHOTS = ROOT / "test-output"


@dataclass
class Stack:
    env: dict[str, str]
    port: int
    home: Path
    ids: dict[str, UUID]
    tiny: dict


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    home = tmp_path_factory.mktemp("stack")
    data = home / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_chat_rows(40)))
    tiny = load_config(
        None,
        {
            **tiny_overrides(home, data, build_tiny_model_dir(home / "tiny-model")),
            # the worker runs it with every test of the module waiting: fewer steps, samples and tokens
            "training.max_steps": 4,
            "evaluation.max_generation_samples": 2,
            "evaluation.max_new_tokens": 8,
            "merge.verify_prompts": 1,
            "publish.model_name": MODEL,
        },
    )
    port = free_port()
    with prefect_server(home / "prefect", port, home / "server.log") as env, api_of(env):
        ids = register(load_config(ROOT / "configs" / "demo.yaml"), k8s_image=K8S_IMAGE)
        yield Stack(env, port, home, ids, tiny.model_dump(mode="json"))
    # server and worker logs next to the screenshot, for failed CI runs
    SCREENSHOTS.mkdir(exist_ok=True)
    for name in ("server.log", "worker.log"):
        if (home / name).exists():
            shutil.copy(home / name, SCREENSHOTS / f"stack-{name}")


@pytest.fixture(scope="module")
def worker(stack: Stack):
    with process_worker(stack.env, stack.home / "worker.log") as proc:
        yield proc


def _wait_final(run_id: UUID, stack: Stack, timeout_s: float = 600) -> FlowRun:
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(2)
    logs = (stack.home / "worker.log").read_text()[-4000:]
    raise AssertionError(f"flow run {run_id} not finished after {timeout_s:.0f} s; worker log tail:\n{logs}")


def _published_events(run: FlowRun, timeout_s: float = 60) -> list:
    """`model.published` events of this model since the run started; the server stores events asynchronously."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=["model.published"]), occurred=EventOccurredFilter(since=run.start_time)
                ),
                limit=50,  # the server's page maximum
            )
            found = [e for e in page.events if e.payload.get("model") == MODEL]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(2)


def test_deployments_registered_with_typed_form_schedule_and_pools(stack: Stack):
    with get_client(sync_client=True) as client:
        manual = client.read_deployment(stack.ids[MANUAL])
        scheduled = client.read_deployment(stack.ids[SCHEDULED])
        sweep = client.read_deployment(stack.ids[SWEEP])
        k8s = client.read_deployment(stack.ids[f"{MANUAL}-k8s"])
        assert client.read_work_pool(PROCESS_POOL).type == "process"
        k8s_pool = client.read_work_pool(K8S_POOL)
    # The Run form is built from this schema: nested sections with the pipeline's defaults.
    schema = manual.parameter_openapi_schema
    assert schema["properties"]["config"]["$ref"].endswith("/PipelineConfig")
    assert schema["definitions"]["LoraSettings"]["properties"]["r"]["default"] == 16
    assert schema["definitions"]["TrainingConfig"]["properties"]["max_steps"]["type"] == "integer"
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert manual.parameters["config"]["training"]["max_steps"] == demo.training.max_steps
    assert manual.work_pool_name == sweep.work_pool_name == PROCESS_POOL
    assert manual.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    assert {"qlora", f"model:{MODEL}"} <= set(manual.tags)
    (schedule,) = scheduled.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (demo.schedule.cron, demo.schedule.timezone)
    assert manual.global_concurrency_limit.limit == scheduled.global_concurrency_limit.limit == 1
    assert scheduled.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert manual.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert k8s_pool.type == "kubernetes"
    assert k8s_pool.base_job_template["variables"]["properties"]["gpus"]["default"] >= 1
    assert k8s.work_pool_name == K8S_POOL and k8s.job_variables["image"] == K8S_IMAGE
    assert k8s.entrypoint == "flows/pipeline.py:qlora_pipeline"


def test_one_run_per_deployment_at_a_time(stack: Stack):
    """Server-side deployment limits: a second scheduled run is cancelled, a second manual run waits."""
    with get_client(sync_client=True) as client:
        for name, expected in [(SCHEDULED, "CANCELLED"), (MANUAL, "SCHEDULED")]:
            first = client.create_flow_run_from_deployment(stack.ids[name])
            second = client.create_flow_run_from_deployment(stack.ids[name])
            assert client.set_flow_run_state(first.id, Pending()).state.type.value == "PENDING"
            blocked = client.set_flow_run_state(second.id, Pending()).state
            assert blocked.type.value == expected, (name, blocked)
            if expected == "SCHEDULED":
                assert blocked.name == "AwaitingConcurrencySlot"
            for run in (first, second):  # free the slot for the tests that follow
                client.set_flow_run_state(run.id, Cancelled(), force=True)


@pytest.fixture(scope="module")
def manual_run(stack: Stack, worker) -> FlowRun:
    return _wait_final(run_deployment(MANUAL, parameters={"config": stack.tiny}, timeout=0).id, stack)


def test_manual_run_with_override_publishes_through_the_worker(stack: Stack, manual_run: FlowRun):
    assert manual_run.state.type.value == "COMPLETED", manual_run.state.message
    assert manual_run.name.startswith(f"{MODEL} | train | ")
    assert {"qlora", f"model:{MODEL}"} <= set(manual_run.tags)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[manual_run.id]))
        )
    keys = {a.key for a in artifacts}
    assert {"data-validation", "training-progress", "eval-comparison", f"model-{MODEL}", f"published-{MODEL}"} <= keys
    progress = next(a for a in artifacts if a.key == "training-progress")
    assert progress.data == 100.0
    (published,) = _published_events(manual_run)
    # the resource names the store as well as the model, and the alias the run moves
    assert published.resource.id == model_resource(PipelineConfig.model_validate(stack.tiny))["prefect.resource.id"]
    assert published.resource["qlora-flow.alias"] == "production"
    assert "loss" in published.payload["metrics"] and published.payload["alias_moved"] is True
    assert f"prefect.flow-run.{manual_run.id}" in {r.id for r in published.related}
    alias = json.loads((stack.home / "store" / "models" / MODEL / "production.json").read_text())
    assert alias["run_id"] == published.payload["run_id"]


def test_scheduled_retrain_is_a_no_op_when_nothing_changed(stack: Stack, manual_run: FlowRun):
    run = _wait_final(run_deployment(SCHEDULED, parameters={"config": stack.tiny}, timeout=0).id, stack)
    assert run.state.type.value == "COMPLETED" and run.state.name == "Unchanged"
    assert "nothing to retrain" in run.state.message and run.name.startswith(f"retrain {MODEL} | train | ")
    assert run.total_run_time.total_seconds() < 60


def test_ui_shows_the_evaluation_report(stack: Stack, manual_run: FlowRun):
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed: apt-get install -y chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    SCREENSHOTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{stack.port}/runs/flow-run/{manual_run.id}", wait_until="networkidle")
            page.get_by_text(manual_run.name).first.wait_for(timeout=60_000)
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("eval-comparison").first.wait_for(timeout=60_000)
            page.get_by_text("eval-comparison").first.click()
            # the artifact page renders the evaluation report's markdown
            page.get_by_text("Evaluation of run").first.wait_for(timeout=60_000)
            page.get_by_text("Quality gate: passed").first.wait_for(timeout=10_000)
            page.screenshot(path=str(SCREENSHOTS / "flow-run-eval-report.png"), full_page=True)
        finally:
            browser.close()
    assert (SCREENSHOTS / "flow-run-eval-report.png").stat().st_size > 10_000


def test_rejection_event_pauses_the_schedule(stack: Stack, manual_run: FlowRun):
    """The registered automation: a `model.rejected` event for this model pauses scheduled retraining."""
    # what a rejected run of the deployments' (demo) config emits from the worker's directory, sent with Prefect's
    # CLI from a process of its own: this process's events client keeps the API URL of the first server it met
    resource = model_resource(load_config(ROOT / "configs" / "demo.yaml"), ROOT)
    payload = {"run_id": "test", "reasons": ["tuned loss above base loss"]}
    emit = [sys.executable, "-m", "prefect", "event", "emit", "model.rejected", "--resource", json.dumps(resource)]
    emitted = subprocess.run(
        [*emit, "--payload", json.dumps(payload)], env=stack.env, capture_output=True, text=True, timeout=120
    )
    assert emitted.returncode == 0, emitted.stdout + emitted.stderr
    deadline = time.monotonic() + 90
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if client.read_deployment(stack.ids[SCHEDULED]).paused:
                break
            time.sleep(2)
        assert client.read_deployment(stack.ids[SCHEDULED]).paused
        assert not client.read_deployment(stack.ids[MANUAL]).paused
