"""`qlora-flow schedule status|resume` and the rejection automation against a real Prefect server
(`prefect server start` on loopback, deployments registered by deployments/deploy.py).

Only a rejection of a run that would move the scheduled deployment's alias in the same store pauses
retraining; `status` names the automation, the rejected run and its reasons; `resume` resumes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from deployments.deploy import MANUAL, ROOT, SCHEDULED, register
from deployments.local import api_of, free_port, prefect_server
from qlora_flow.config import PipelineConfig
from qlora_flow.model_events import model_resource

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "demo-order-extractor"
QLORA_FLOW = [sys.executable, "-m", "qlora_flow.cli"]
AUTOMATION = f"pause retraining of {MODEL} on model.rejected"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("schedule")
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["execution"]["store"] = str(home / "store")
    cfg = PipelineConfig.model_validate(raw)
    with prefect_server(home / "prefect", free_port(), home / "server.log") as env, api_of(env):
        yield env, cfg, register(cfg)


def _variant(cfg: PipelineConfig, **changes) -> PipelineConfig:
    raw = cfg.model_dump()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return PipelineConfig.model_validate(raw)


def _reject(cfg: PipelineConfig, run_id: str, reasons: list[str]):
    """The event tasks/evaluate.py emits when a candidate fails the gate (flow runs start in ROOT)."""
    return emit_event(
        event="model.rejected", resource=model_resource(cfg, ROOT), payload={"run_id": run_id, "reasons": reasons}
    )


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*QLORA_FLOW, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def _wait(condition, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)
    return result


def test_only_a_production_rejection_pauses_and_status_says_why_then_resume(stack):
    env, cfg, ids = stack
    other_store = _variant(cfg, execution__store=str(Path(cfg.execution.store).parent / "other-store"))
    experiment = _reject(_variant(cfg, publish__alias="experiment"), "exp-1", ["FAIL exact match 0.2, required >= 0.9"])
    unpublished = _reject(_variant(cfg, publish__enabled=False), "exp-2", ["FAIL loss"])
    elsewhere = _reject(other_store, "other-1", ["FAIL loss"])
    production = _reject(cfg, "prod-1", ["FAIL exact match 0.1000, required >= 0.3000", "FAIL loss improvement"])
    assert len({e.resource.id for e in (production, elsewhere)}) == 2  # same model, another store

    with get_client(sync_client=True) as client:
        _wait(lambda: client.read_deployment(ids[SCHEDULED]).paused, "the automation to pause the schedule")

        def triggered_by() -> list[str]:
            page = client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=["prefect.automation.triggered"]),
                    resource=EventResourceFilter(labels={"prefect.resource.name": AUTOMATION}),
                ),
                limit=50,
            )
            return [e.payload["triggering_event"]["id"] for e in page.events]

        # the other rejections were emitted (and evaluated) first: had one matched, it would be here too
        assert _wait(triggered_by, "the automation's triggered event") == [str(production.id)]
        assert not client.read_deployment(ids[MANUAL]).paused
    assert {experiment.resource["qlora-flow.alias"], unpublished.resource.get("qlora-flow.alias")} == {
        "experiment",
        None,
    }

    status = _cli(env, "schedule", "status", MODEL)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith(f"{MODEL}  {SCHEDULED}  PAUSED  schedule: 0 3 * * * (UTC), on")
    assert f'by automation "{AUTOMATION}"' in lines[1]
    assert lines[2] == "    after model.rejected of run prod-1"
    assert lines[3] == f"    store {Path(cfg.execution.store).as_uri()}, alias production; reasons:"
    assert lines[4:6] == ["      - FAIL exact match 0.1000, required >= 0.3000", "      - FAIL loss improvement"]
    assert lines[6] == f"    resume: qlora-flow schedule resume {MODEL}"

    resumed = _cli(env, "schedule", "resume", MODEL)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"ok: resumed {SCHEDULED} (paused ") and AUTOMATION in resumed.stdout
    with get_client(sync_client=True) as client:
        assert client.read_deployment(ids[SCHEDULED]).paused is False
    assert "not paused" in _cli(env, "schedule", "status").stdout.splitlines()[0]
    assert _cli(env, "schedule", "resume", MODEL).stdout.startswith("ok: no scheduled deployment of")


def test_a_pause_by_hand_is_reported_as_such(stack):
    env, _, ids = stack
    with get_client(sync_client=True) as client:
        client.pause_deployment(ids[SCHEDULED])
    lines = _wait(
        lambda: "by hand" in (out := _cli(env, "schedule", "status", MODEL).stdout) and out.splitlines(),
        "the pause event",
    )
    assert "PAUSED" in lines[0] and "by hand (UI, API or `prefect` CLI), not by an automation" in lines[1]
    assert _cli(env, "schedule", "resume", MODEL).returncode == 0
    with get_client(sync_client=True) as client:
        assert client.read_deployment(ids[SCHEDULED]).paused is False


def test_errors_are_one_line(stack):
    env, _, _ = stack
    unknown = _cli(env, "schedule", "status", "no-such-model")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        (
            f"error: no scheduled qlora-flow deployment of model 'no-such-model' on {env['PREFECT_API_URL']}; register "
            "them with `python -m deployments.deploy` (scripts/local_stack.sh does) or check the model name"
        )
    ]
    no_api = _cli({k: v for k, v in env.items() if k != "PREFECT_API_URL"}, "schedule", "resume", MODEL)
    assert no_api.returncode == 2 and no_api.stderr.startswith("error: PREFECT_API_URL is not set")
