"""The console: stage-named progress lines, no telemetry errors offline, no library warnings a user cannot act on."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from qlora_flow import console

ROOT = Path(__file__).resolve().parent.parent


def _record(message: str, **extra) -> logging.LogRecord:
    record = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    return record


def test_formatter_names_the_stage_of_every_task_line():
    fmt = console.StageFormatter()
    assert fmt.format(_record("Finished in state Completed()", task_name="train_adapter")).endswith(
        "INFO [train] Finished in state Completed()"
    )
    assert fmt.format(_record("Finished in state Completed()", task_name="evaluate")).endswith(
        "[evaluate] Finished in state Completed()"
    )
    assert fmt.format(_record("Finished in state Completed()", flow_name="qlora-finetune")).endswith(
        "[qlora-finetune] Finished in state Completed()"
    )
    # a progress line names its own stage; a library line keeps its logger name
    assert fmt.format(_record("[merge] verifying 2/4", task_name="merge")).endswith("INFO [merge] verifying 2/4")
    assert fmt.format(logging.LogRecord("tasks.train", 20, "", 1, "plan %s", ("x",), None)).endswith(
        "tasks.train: plan x"
    )


def test_stage_progress_logs_first_throttled_and_last():
    lines: list[str] = []
    logger = SimpleNamespace(info=lambda fmt, *args: lines.append(fmt % args))
    progress = console.StageProgress("evaluate", "tuned model: generation", 50, every_s=3600, logger=logger)
    for _ in range(50):
        progress.advance()
    assert [line.split(" (")[0] for line in lines] == [
        "[evaluate] tuned model: generation 1/50",
        "[evaluate] tuned model: generation 50/50",
    ]
    assert "eta 0:00:00" in lines[-1]


def test_library_noise_filters_are_narrow():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console._quieted = False
        console.quiet_library_noise()
        for module in ("transformers.modeling_utils", "peft.tuners", "trl.trainer.sft_trainer", "qlora_flow.config"):
            warnings.warn_explicit("x is deprecated", FutureWarning, "f.py", 1, module=module)
        warnings.warn_explicit("not a deprecation", UserWarning, "f.py", 1, module="transformers.trainer")
    assert [(str(w.message), w.category) for w in caught] == [
        ("x is deprecated", FutureWarning),  # ours: still shown
        ("not a deprecation", UserWarning),
    ]
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    kept = [
        f.filter(_record(m))
        for f in bnb.filters
        for m in ("Failed to load CPU gemm_4bit_forward ... `pip install kernels` and the kernels >= 0.11.1", "other")
    ]
    assert kept == [False, True]


def test_telemetry_is_switched_off_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    monkeypatch.setenv("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "true")
    console.disable_prefect_telemetry()
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY"] == "true"


def test_rejected_run_keeps_exit_code_3(monkeypatch, capsys):
    """The rejected state is Failed-type (red in the UI); the CLI still reads it as a rejection."""
    from prefect.states import Failed

    import flows.pipeline
    from flows.pipeline import CandidateRejected
    from qlora_flow import cli

    result = SimpleNamespace(
        run_id="r1",
        status="rejected",
        message="quality gate failed: exact match",
        report=SimpleNamespace(base_metrics={"loss": 2.0}, tuned_metrics={"loss": 1.0}),
        adapter=SimpleNamespace(uri="/a"),
        merged=None,
        published=None,
    )
    monkeypatch.setattr(
        flows.pipeline,
        "qlora_pipeline",
        lambda cfg, return_state: Failed(name="Rejected", data=CandidateRejected(result)),
    )
    assert cli.cmd_run(SimpleNamespace(config=None, set=[], debug=True)) == cli.EXIT_REJECTED
    assert "run r1: rejected" in capsys.readouterr().out
    crash = Failed(message="boom", data=RuntimeError("boom"))
    monkeypatch.setattr(flows.pipeline, "qlora_pipeline", lambda cfg, return_state: crash)
    with pytest.raises(RuntimeError, match="boom"):  # a crash is not a rejection: main() prints it as an error line
        cli.cmd_run(SimpleNamespace(config=None, set=[], debug=True))


@pytest.mark.slow
def test_cli_run_prints_stage_progress_and_no_noise(tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k not in console.TELEMETRY_OFF}  # the CLI must switch it off itself
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a shared, busy CI box
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_flow.cli", "run", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    steps = tiny_config.training.max_steps
    assert f"[train] step {steps}/{steps} loss " in out and " tok/s " in out and " eta " in out
    assert "[evaluate] base model: generation" in out and f"[evaluate] tuned model: generation {4}/{4}" in out
    assert (
        "[merge] reference answers of the adapter: prompt 2/2" in out
        and "[merge] verifying the saved model: prompt 2/2" in out
    )
    for stage in ("validate", "base", "train", "evaluate", "merge", "publish", "qlora-finetune"):
        assert f"[{stage}] Finished in state Completed()" in out, stage
    assert "INFO Finished in state" not in out  # every one names its stage
    for noise in (
        "Failed to send telemetry",
        "send_telemetry_heartbeat",
        "FutureWarning",
        "pip install kernels",
        "{'loss'",
    ):
        assert noise not in out, noise
