"""What a person watching the console (or a flow run's logs) sees: stage-named progress lines, and
no noise they cannot act on.

- `StageProgress` writes throttled `[stage] what i/n ... eta h:mm:ss` lines into the Prefect run's
  logs (plain logging outside a run), so the long silent parts (evaluation, merge verification)
  say where they are.
- `StageFormatter` names the stage on every console line of a task run, including Prefect's own
  "Finished in state Completed()".
- `quiet_library_noise()` drops library warnings that only the library's authors can act on,
  matched by message and module, never wholesale.
- `disable_prefect_telemetry()` keeps an offline machine from logging failed telemetry uploads.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from datetime import timedelta

# task name -> stage label on console lines; other tasks show their own name
STAGE_LABELS = {
    "validate-dataset": "validate",
    "prepare_base_model": "base",
    "train_adapter": "train",
    "evaluate": "evaluate",
    "merge": "merge",
    "publish": "publish",
}

# Set only where the user has not set them: the ephemeral server would otherwise post a heartbeat to
# Prefect's analytics endpoint (offline: "Failed to send telemetry", and a locked-SQLite traceback
# when the write races the flow's own).
TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
}


def disable_prefect_telemetry() -> None:
    """Call before Prefect is imported: settings are read once."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_quieted = False


def quiet_library_noise() -> None:
    """Drop, in this process, the warnings a user of the pipeline cannot act on. Idempotent."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    # Deprecations inside transformers/peft/trl (e.g. transformers calling its own renamed
    # `gradient_checkpointing`): raised from the libraries' modules, fixed by upgrading them.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl)(\.|$)")
    # bitsandbytes on CPUs: an optional faster kernel package is absent; the built-in kernel runs.
    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in bnb_cpu.filters):
        bnb_cpu.addFilter(_DropMessage(r"pip install kernels"))
    # The gguf writer narrates its own file writes ("Writing the following files: ...partial") at INFO;
    # the export stage logs each finished, verified file itself.
    logging.getLogger("gguf").setLevel(logging.WARNING)


# The project's module loggers: quarantine WARNINGs (qlora_flow.store, .integrity), cache adoption (.code_lineage),
# the stages' own lines (tasks.*).
PROJECT_LOGGERS = ("qlora_flow", "tasks", "flows")


def send_project_logs_to_runs() -> None:
    """Send the project's module loggers to the Prefect run they are logged in, as its run loggers are: an
    operator reads a run in the UI, where a healed cache's WARNING must show too, not only on the console of
    the process that ran it. What these loggers say outside any run stays on the console. Idempotent."""
    from prefect.logging.handlers import APILogHandler

    class _InRunsOnly(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            from prefect.context import FlowRunContext, TaskRunContext

            return FlowRunContext.get() is not None or TaskRunContext.get() is not None

    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            handler = APILogHandler()
            handler.addFilter(_InRunsOnly())
            logger.addHandler(handler)
        if logger.level == logging.NOTSET:  # a worker's root logger stops at WARNING; adoption lines are INFO
            logger.setLevel(logging.INFO)


def stage_of(record: logging.LogRecord) -> str | None:
    """The stage a log record belongs to, from the task/flow names Prefect's run loggers attach."""
    task_name = getattr(record, "task_name", None)
    if task_name:
        return STAGE_LABELS.get(task_name, task_name)
    return getattr(record, "flow_name", None)


class StageFormatter(logging.Formatter):
    """`time LEVEL [stage] message`; a message that starts with `[` already names its stage."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        stage = stage_of(record)
        prefix = "" if message.startswith("[") else f"[{stage}] " if stage else f"{record.name}: "
        return super().format(logging.makeLogRecord({**record.__dict__, "msg": prefix + message, "args": None}))


def setup_console(level: int = logging.INFO) -> None:
    """The root handler for the CLI; installed before Prefect is imported, so Prefect keeps it."""
    handler = logging.StreamHandler()
    handler.setFormatter(StageFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def run_logger(stage: str) -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow/task run (console + UI), else `qlora_flow.<stage>`."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(f"qlora_flow.{stage}")


def clock(seconds: float) -> str:
    return str(timedelta(seconds=max(0, round(seconds))))


class StageProgress:
    """`[stage] what i/n (elapsed, eta)` lines: the first, then at most one per `every_s`, and the last."""

    def __init__(self, stage: str, what: str, total: int, every_s: float = 10.0, logger=None):
        self.stage, self.what, self.total, self.every_s = stage, what, total, every_s
        self.logger = logger or run_logger(stage)
        self.done = 0
        self.started = time.monotonic()
        self._last_logged: float | None = None

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        due = self._last_logged is None or now - self._last_logged >= self.every_s or self.done >= self.total
        if not due:
            return
        self._last_logged = now
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        self.logger.info(
            "[%s] %s %d/%d (elapsed %s, eta %s)",
            self.stage,
            self.what,
            self.done,
            self.total,
            clock(elapsed),
            clock(eta),
        )
