"""`qlora-flow` command line: run the pipeline, validate data, pull a published model.

Expected failures (bad config, bad data, missing files, failed verification, unreachable or
unauthorised storage, an unknown model) end with one `error:` line and a non-zero exit code, not a
traceback; `--debug` shows the traceback. Configs are checked (qlora_flow.preflight) before torch,
transformers or Prefect are imported, so such errors come back in seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from qlora_flow.config import STORE_NAME_PATTERN, ConfigError, PipelineConfig, load_config, store_name_problem
from qlora_flow.console import disable_prefect_telemetry, quiet_library_noise, setup_console
from qlora_flow.errors import one_line
from qlora_flow.schedule_ops import add_schedule_parser

EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED = 1, 2, 3


def _overrides(pairs: list[str]) -> dict:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set training.max_steps=10")
        try:
            result[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML; put quotes around a text value") from None
    return result


def _load(args) -> PipelineConfig:
    from qlora_flow.preflight import preflight

    cfg = load_config(args.config, _overrides(args.set))
    preflight(cfg)
    return cfg


class _WithoutTraceback(logging.Formatter):
    """Formats a record as its formatter would, minus the traceback (that is what --debug is for)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None  # the record is shared with other handlers
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _hide_console_tracebacks() -> None:
    """Prefect logs a failing task or flow with its traceback on the console; the CLI's one `error:` line
    replaces it. Handlers that send logs elsewhere (the Prefect API, files) keep the traceback."""
    loggers = [
        logging.getLogger(),
        *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    for handler in {h for lg in loggers for h in lg.handlers}:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter))


def cmd_run(args) -> int:
    cfg = _load(args)
    from flows.pipeline import REJECTED, CandidateRejected, qlora_pipeline

    if not args.debug:
        _hide_console_tracebacks()
    state = qlora_pipeline(cfg, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, CandidateRejected):
        result = result.result
    if (state.is_failed() and state.name != REJECTED) or state.is_crashed():
        if isinstance(result, BaseException):
            raise result  # main() prints it as one line (or the traceback with --debug)
        raise RuntimeError(f"run failed: {state.message or result}")
    print(_summary(result))
    return EXIT_REJECTED if result.status == "rejected" else 0


def _summary(result) -> str:
    base, tuned = result.report.base_metrics, result.report.tuned_metrics
    lines = [f"run {result.run_id}: {result.status}", f"  {result.message}"]
    for name in sorted(set(base) | set(tuned)):
        lines.append(
            f"  {name:>22}: base {base.get(name, float('nan')):.4f}  tuned {tuned.get(name, float('nan')):.4f}"
        )
    lines.append(f"  adapter: {result.adapter.uri}")
    if result.merged:
        lines.append(f"  merged model: {result.merged.uri}")
    if result.published:
        lines.append(f"  manifest: {result.published.manifest_uri}")
    return "\n".join(lines)


def cmd_validate(args) -> int:
    cfg = _load(args)
    from qlora_flow.models import load_tokenizer_for
    from qlora_flow.store import open_store
    from tasks.validate import validate_dataset

    ref = validate_dataset(cfg, open_store(cfg.execution), load_tokenizer_for(cfg.base_model))
    print(
        f"ok: {ref.n_train} train + {ref.n_eval} eval rows accepted, {ref.n_rejected} rejected "
        f"(fingerprint {ref.fingerprint[:16]})\n  train: {ref.train_uri}\n  report: {ref.report_uri}"
    )
    return 0


def cmd_pull(args) -> int:
    import re

    from qlora_flow.config import S3Settings
    from qlora_flow.pull import pull_and_verify

    name, _, alias = args.model.partition(":")
    alias = alias or "production"
    for where, value in (("model name", name), ("alias", alias)):
        if not re.fullmatch(STORE_NAME_PATTERN, value):
            raise ConfigError(store_name_problem(f"pull: {where}", value))
    s3 = S3Settings(endpoint_url=args.endpoint_url, checksum_mode=args.checksum_mode)
    if args.store.startswith("s3://"):
        from qlora_flow.preflight import check_s3_uri, quick_s3_client

        check_s3_uri(quick_s3_client(s3, "--endpoint-url"), "--store", args.store, "--endpoint-url")
    part = "adapter" if args.adapter else "gguf" if args.format == "gguf" else "model"
    report = pull_and_verify(args.store, name, alias, Path(args.dest), s3=s3, part=part)  # WARNING for unlisted files
    what = "" if part == "model" else f" ({part})"
    print(f"ok: {name}:{alias}{what} -> {args.dest} ({report.summary()})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as the CLI's one `error:` line (exit 2), like every other failure."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlora-flow", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("run", cmd_run, "run the whole pipeline for CONFIG"),
        ("validate", cmd_validate, "validate the dataset named by CONFIG; non-zero exit on failure"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML pipeline config (see configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. lora.r=8")
        p.set_defaults(func=func)
    p = sub.add_parser("pull", help="download and verify the model an alias points to")
    p.add_argument("model", help="NAME or NAME:ALIAS (default alias: production)")
    p.add_argument("dest", help="directory to create")
    p.add_argument("--store", default=os.environ.get("QLORA_FLOW_STORE", "artifacts"), help="store root or s3:// URI")
    p.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3-compatible endpoint")
    p.add_argument("--checksum-mode", default="when_supported", choices=["when_supported", "when_required"])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--adapter", action="store_true", help="fetch only the LoRA adapter (peft, vLLM, TGI)")
    what.add_argument(
        "--format",
        choices=["safetensors", "gguf"],
        default="safetensors",
        help="merged model as safetensors (default) or the GGUF files",
    )
    p.set_defaults(func=cmd_pull)
    add_schedule_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # before Prefect is imported (the commands import it): its settings and logging set-up read these once
    disable_prefect_telemetry()
    quiet_library_noise()
    setup_console()
    # Prefect's client logs every API request at INFO; progress lines are what a person wants to see.
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
