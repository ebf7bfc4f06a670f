"""Which failures Prefect retries (qlora_flow.errors.is_retryable), and how a failure inside a flow run
reaches the person at the terminal: one `error:` line, no traceback."""

from __future__ import annotations

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from huggingface_hub.errors import RepositoryNotFoundError
from s3server import moto_server, s3env  # noqa: F401  (fixtures)

from qlora_flow.config import ConfigError
from qlora_flow.contracts import DataValidationError
from qlora_flow.errors import is_permanent, is_retryable, one_line


def _client_error(code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject"
    )


def _wrapped_hub_error() -> OSError:
    """What transformers raises for an unknown hub id: an OSError raised from the hub's error."""
    import httpx

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/x/y"))
    try:
        try:
            raise RepositoryNotFoundError("404 Repository Not Found", response=response)
        except RepositoryNotFoundError as hub:
            raise OSError("x/y is not a local folder and is not a valid model identifier") from hub
    except OSError as exc:
        return exc


@pytest.mark.parametrize(
    ("make", "permanent"),
    [
        (lambda: ConfigError("lora.r: bad"), True),
        (lambda: DataValidationError("dataset validation failed:", {}), True),
        (lambda: FileNotFoundError("/data/train.jsonl"), True),
        (lambda: PermissionError("/store"), True),
        (_wrapped_hub_error, True),
        (lambda: NoCredentialsError(), True),
        (lambda: EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (lambda: ConnectTimeoutError(endpoint_url="http://10.0.0.1:9000"), True),
        (lambda: _client_error("InvalidAccessKeyId"), True),
        (lambda: _client_error("SignatureDoesNotMatch"), True),
        (lambda: _client_error("NoSuchBucket"), True),
        (lambda: _client_error("AccessDenied"), True),
        (lambda: _client_error("SlowDown"), False),
        (lambda: _client_error("InternalError"), False),
        (lambda: ReadTimeoutError(endpoint_url="http://minio:9000"), False),
        (lambda: ConnectionResetError("peer reset"), False),
        (lambda: RuntimeError("CUDA error: unspecified launch failure"), False),
    ],
)
def test_permanent_failures_are_told_apart_from_transient_ones(make, permanent):
    from prefect.states import Failed

    exc = make()
    assert is_permanent(exc) is permanent
    assert is_retryable(None, None, Failed(data=exc)) is (not permanent)


def test_one_line_names_what_to_fix():
    assert one_line(ConfigError("lora.r: bad")) == "lora.r: bad"
    assert "http://127.0.0.1:1" in one_line(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert "rejected the credentials (InvalidAccessKeyId)" in one_line(_client_error("InvalidAccessKeyId"))
    lines = one_line(OSError("first\nsecond")).splitlines()
    assert lines == ["OSError: first", "  second"]  # continuation lines never start with `error:`


def test_pipeline_tasks_retry_only_what_a_retry_can_fix():
    from tasks.evaluate import evaluate_task
    from tasks.prepare_base import prepare_base_model_task
    from tasks.publish import publish_task
    from tasks.train import train_adapter_task
    from tasks.validate import validate_dataset_task

    for task in (validate_dataset_task, prepare_base_model_task, train_adapter_task, evaluate_task, publish_task):
        assert task.retries >= 1 and task.retry_condition_fn is is_retryable, task.name


def test_prefect_runs_a_permanent_failure_once_and_retries_a_transient_one(prefect_api):
    from prefect import flow, task

    attempts: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=is_retryable)
    def stage(kind: str) -> None:
        attempts.append(kind)
        raise ConfigError("base_model.id: nope") if kind == "permanent" else ConnectionResetError("reset")

    @flow
    def pipeline(kind: str) -> None:
        stage(kind)

    for kind in ("permanent", "transient"):
        state = pipeline(kind, return_state=True)
        assert state.is_failed()
    assert attempts.count("permanent") == 1
    assert attempts.count("transient") == 3


def test_a_failure_inside_the_flow_is_one_error_line(prefect_api, monkeypatch, tmp_path, capfd):
    """`qlora-flow run` prints the flow's exception as one line; Prefect's console logs lose the traceback."""
    from prefect import flow, task

    import flows.pipeline
    from qlora_flow import cli

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=is_retryable)
    def stage() -> None:
        raise PermissionError(13, "Permission denied", "/store/runs/x")

    @flow
    def failing_pipeline(config) -> None:
        stage()

    monkeypatch.setattr(flows.pipeline, "qlora_pipeline", failing_pipeline)
    config = tmp_path / "cfg.yaml"
    train = tmp_path / "train.jsonl"
    train.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config.write_text(
        f"data:\n  train_path: {train}\nbase_model:\n  id: {model}\nexecution:\n  store: {tmp_path / 's'}\n"
    )

    assert cli.main(["run", str(config)]) == cli.EXIT_FAILED
    out, err = capfd.readouterr()
    errors = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert errors == ["error: PermissionError: [Errno 13] Permission denied: '/store/runs/x'"]
    assert "Traceback" not in out + err
    assert "Retrying" not in out + err  # the permanent error ran once


def test_flows_give_s3_its_configured_retries_and_the_cli_one(s3env, tmp_path):
    """The CLI reports a dead endpoint after one retry; an unattended flow run allows execution.s3.max_attempts."""
    from qlora_flow.config import load_config
    from qlora_flow.preflight import check_s3_locations

    cfg = load_config(
        None,
        {
            "execution.store": f"s3://{s3env.bucket}/store",
            "execution.s3": s3env.settings(max_attempts=4).model_dump(),
        },
    )
    check_s3_locations(cfg)  # the endpoint answers: nothing to report
    s3env.proxy.dark = True  # every connection is closed unanswered
    for quick, attempts in ((True, 2), (False, 4)):
        s3env.proxy.log.clear()
        with pytest.raises(ConfigError, match=r"execution\.s3\.endpoint_url: .* does not answer S3 requests"):
            check_s3_locations(cfg, quick=quick)
        assert len(s3env.proxy.log) == attempts
