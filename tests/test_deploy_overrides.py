"""Partial overrides through a real Prefect server (`prefect server start` on loopback): runs triggered
with only the fields to change, by `prefect deployment run -p` and by the Python client, resolve to the
deployment's config with just those fields changed; a misspelt key is refused when the run is created, a
bad value fails the run with one line.

The deployments are registered with the demo config pointing at a missing data file, so each run
stops right after resolving its config (`resolved-config` artifact) at the data check, in seconds
instead of a training. `prefect flow-run execute` runs them as a worker would (pull step included).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.deployments import run_deployment

from deployments.deploy import MANUAL, ROOT, SCHEDULED, SWEEP, register
from deployments.local import api_of, free_port, prefect_server
from qlora_flow.config import PipelineConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("overrides")
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["data"]["train_path"] = str(home / "missing.jsonl")  # the run fails fast once its config is resolved
    raw["execution"]["store"] = str(home / "store")
    cfg = PipelineConfig.model_validate(raw)
    with prefect_server(home / "prefect", free_port(), home / "server.log") as env, api_of(env):
        yield env, cfg, register(cfg)


def _execute(env: dict, *run_ids) -> None:
    """Run flow runs the way a process worker does, side by side; each ends Failed (no data file)."""
    procs = [
        subprocess.Popen(
            [PREFECT, "flow-run", "execute", str(i)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in run_ids
    ]
    for proc in procs:
        proc.wait(timeout=300)


def _resolved(run_id) -> tuple[str, dict]:
    """(summary line, config) from the run's `resolved-config` artifact."""
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=["resolved-config"])
            )
        )
    return artifact.description, yaml.safe_load(re.search(r"```yaml\n(.*)```", artifact.data, re.DOTALL).group(1))


def test_run_form_defaults_are_the_deployment_config(stack):
    _, cfg, ids = stack
    with get_client(sync_client=True) as client:
        schema = client.read_deployment(ids[MANUAL]).parameter_openapi_schema
    # was PipelineConfig()'s defaults (model demo-extractor, max_seq_length 512), not the demo config
    assert schema["properties"]["config"]["default"] == cfg.model_dump(mode="json")
    assert schema["properties"]["config"]["default"]["training"]["max_seq_length"] == 256


def test_partial_overrides_from_cli_and_client_apply_on_the_deployment_config(stack):
    env, cfg, _ = stack
    cli = subprocess.run(
        [
            PREFECT,
            "deployment",
            "run",
            MANUAL,
            "-p",
            'config={"training": {"max_steps": 10}}',
            "-p",
            'overrides={"lora.r": 8}',
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    cli_run = re.search(r"UUID: ([0-9a-f-]{36})", cli.stdout).group(1)
    client_run = run_deployment(
        MANUAL, parameters={"config": {"evaluation": {"gate": {"min_exact_match": 0.9}}}}, timeout=0
    ).id
    retrain_run = run_deployment(SCHEDULED, parameters={"overrides": {"training.learning_rate": 0.0005}}, timeout=0).id
    # a known key with a wrong value passes the schema and fails the run at once, with the CLI's message
    bad_run = run_deployment(MANUAL, parameters={"overrides": {"training.max_steps": "ten"}}, timeout=0).id
    _execute(env, cli_run, client_run, retrain_run, bad_run)

    expected = cfg.model_dump(mode="json")
    summary, resolved = _resolved(cli_run)
    assert summary.endswith("changed: lora.r=8, training.max_steps=10")
    assert resolved == {
        **expected,
        "lora": {**expected["lora"], "r": 8},
        "training": {**expected["training"], "max_steps": 10},
    }
    assert resolved["lora"]["dropout"] == 0.0 and resolved["publish"]["model_name"] == "demo-order-extractor"

    summary, resolved = _resolved(client_run)
    assert summary == f"config: deployment {MANUAL}'s config, changed: evaluation.gate.min_exact_match=0.9"
    gate = {**expected["evaluation"]["gate"], "min_exact_match": 0.9}
    assert resolved == {**expected, "evaluation": {**expected["evaluation"], "gate": gate}}

    summary, resolved = _resolved(retrain_run)
    assert summary == f"config: deployment {SCHEDULED}'s config, changed: training.learning_rate=0.0005"

    with get_client(sync_client=True) as client:
        runs = {i: client.read_flow_run(i) for i in (cli_run, client_run, retrain_run, bad_run)}
    for run_id in (cli_run, client_run, retrain_run):
        # each got past resolution and stopped at the deployment's (missing) data file
        assert runs[run_id].state.type.value == "FAILED"
        assert "data.train_path: file" in runs[run_id].state.message
    assert runs[cli_run].name.startswith("demo-order-extractor | missing | ")
    assert runs[retrain_run].name.startswith("retrain demo-order-extractor | missing | ")
    bad = runs[bad_run].state
    assert bad.type.value == "FAILED"
    assert "invalid configuration in the run's parameters" in bad.message
    assert "training.max_steps:" in bad.message and "'ten'" in bad.message
    assert runs[bad_run].name.startswith("invalid config | ")


def _run_from_cli(env: dict, parameter: str) -> tuple[int, str]:
    """`prefect deployment run` of the manual deployment with one `-p`: exit code and output on one line."""
    cli = subprocess.run(
        [PREFECT, "deployment", "run", MANUAL, "-p", parameter], env=env, capture_output=True, text=True, check=False
    )
    return cli.returncode, " ".join(cli.stdout.split())


def test_a_bad_key_in_config_is_refused_when_the_run_is_created(stack):
    code, output = _run_from_cli(stack[0], 'config={"training": {"max_step": 10}}')
    assert code == 1
    assert "'config.training'" in output and "'max_step' was unexpected" in output


def test_a_misspelt_override_key_is_refused_when_the_run_is_created(stack):
    """With one run at a time, a run that fails only when it starts may wait hours behind a training first."""
    code, output = _run_from_cli(stack[0], 'overrides={"training.max_stepz": 10}')
    assert code == 1
    assert "'overrides'" in output and "'training.max_stepz' is not valid" in output
    for deployment in (SCHEDULED, SWEEP):  # every flow that takes `overrides`
        with pytest.raises(Exception, match="training.max_stepz"):
            run_deployment(deployment, parameters={"overrides": {"training.max_stepz": 10}}, timeout=0)
    # sections, nested fields and a mapping's own keys are all settable (the run is created, never executed)
    accepted = {"lora": {"r": 8}, "evaluation.gate.min_exact_match": 0.5, "data.column_mapping.prompt": "question"}
    assert run_deployment(MANUAL, parameters={"overrides": accepted}, timeout=0).parameters["overrides"] == accepted
