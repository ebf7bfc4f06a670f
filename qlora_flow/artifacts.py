"""Prefect UI artifacts that an operator can read in the browser: no `file://` links (browsers refuse
them from a web page), tables that fit a laptop screen, progress with numbers.

- Loss curve: the numbers as a compact markdown table (at most `LOSS_TABLE_ROWS` evenly spaced
  steps) with a sparkline; on S3 stores also the PNG through a presigned URL.
- Model: the exact `qlora-flow pull` command (verifies every byte); on S3 stores also a presigned
  link to the manifest.
- Eval samples: one block per sample (prompt, then reference, tuned and base answers), which wraps
  to any window; the Prefect UI never wraps table cells (measured at 1,440 px: 868 px for the table,
  and four 60-character cells need 1,912), so a table that fits would cut answers to ~25 characters.
  Each text is cut at `SAMPLE_CHARS` with an ellipsis; the full text stays in `samples.jsonl`.
- Training progress: the progress bar plus step, loss, tokens/s, elapsed and ETA in its description.

Presigned URLs are valid for `PRESIGNED_URL_EXPIRY_S` (7 days, the maximum of S3 SigV4 signatures);
after that, open the run's artifact again from a new run, or use `qlora-flow pull`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from qlora_flow.config import PipelineConfig, S3Settings
from qlora_flow.console import clock
from qlora_flow.refs import LossPoint, PublishedModel
from qlora_flow.store import ArtifactStore

PRESIGNED_URL_EXPIRY_S = 7 * 24 * 3600
LOSS_TABLE_ROWS = 20
SAMPLE_CHARS = 200
SAMPLES_SHOWN = 20
SPARK_CHARS = "▁▂▃▄▅▆▇█"


# ---------------------------------------------------------------- pure helpers


def browser_url(store: ArtifactStore, uri: str, expires_s: int = PRESIGNED_URL_EXPIRY_S) -> str | None:
    """An http(s) URL a browser can open for a stored object (presigned GET on S3); None for local stores."""
    if not uri.startswith("s3://"):
        return None
    from qlora_flow.s3store import S3Store, parse_s3_uri

    if not isinstance(store, S3Store):
        return None
    bucket, key = parse_s3_uri(uri)
    return store.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s)


def evenly_spaced(items: Sequence, n: int) -> list:
    """At most n items, first and last included, evenly spaced in between."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def sparkline(values: Sequence[float]) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK_CHARS[round((v - low) / span * (len(SPARK_CHARS) - 1))] for v in values)


def expiry_note(expires_s: int = PRESIGNED_URL_EXPIRY_S) -> str:
    until = datetime.now(timezone.utc) + timedelta(seconds=expires_s)
    return f"link valid for {expires_s // 86400} days, until {until:%Y-%m-%d %H:%M} UTC"


def loss_curve_markdown(history: Sequence[LossPoint], run_id: str, image_url: str | None = None) -> str:
    lines = [f"# Training loss of run `{run_id}`", ""]
    if image_url:
        lines += [f"![training loss curve]({image_url})", "", f"[loss_curve.png]({image_url}) ({expiry_note()})", ""]
    if not history:
        return "\n".join(lines + ["No loss was logged (the adapter came from the cache)."]) + "\n"
    losses = [p.loss for p in history]
    lines += [
        f"{len(history)} logged steps, loss {losses[0]:.4f} → {losses[-1]:.4f} (min {min(losses):.4f})",
        "",
        f"`{sparkline([p.loss for p in evenly_spaced(history, 60)])}`",
        "",
    ]
    with_eval = any(p.eval_loss is not None for p in history)
    lines += ["| step | loss | eval loss |", "|---:|---:|---:|"] if with_eval else ["| step | loss |", "|---:|---:|"]
    for p in evenly_spaced(history, LOSS_TABLE_ROWS):
        eval_cell = (" " if p.eval_loss is None else f" {p.eval_loss:.4f} ") + "|" if with_eval else ""
        lines.append(f"| {p.step} | {p.loss:.4f} |{eval_cell}")
    return "\n".join(lines) + "\n"


def truncate(text: str, width: int = SAMPLE_CHARS) -> str:
    """One line of at most `width` characters, an ellipsis marking the cut."""
    flat = re.sub(r"\s+", " ", str(text)).strip()
    return flat if len(flat) <= width else flat[: width - 1].rstrip() + "…"


def _code(text: str) -> str:
    if not text:
        return "*(empty)*"
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def samples_markdown(samples: Sequence[dict], run_id: str, samples_uri: str, width: int = SAMPLE_CHARS) -> str:
    shown = samples[:SAMPLES_SHOWN]
    lines = [
        f"# Sample generations of run `{run_id}`",
        "",
        f"{len(shown)} of {len(samples)} samples; texts cut at {width} characters. Full text: `{samples_uri}`",
        "",
    ]
    for s in shown:
        mark = " (exact match)" if s.get("tuned_exact_match") else ""
        lines += [
            f"**{s['index'] + 1}.** {_code(truncate(s['prompt'], width))}",
            "",
            f"- reference: {_code(truncate(s['reference'], width))}",
            f"- tuned{mark}: {_code(truncate(s['tuned'], width))}",
            f"- base: {_code(truncate(s['base'], width))}",
            "",
        ]
    return "\n".join(lines)


def pull_command(store_root: str, name: str, alias: str, s3: S3Settings | None = None) -> str:
    parts = ["qlora-flow", "pull", f"{name}:{alias}", f"./{name}", "--store", store_root]
    if store_root.startswith("s3://") and s3 is not None:
        if s3.endpoint_url:
            parts += ["--endpoint-url", s3.endpoint_url]
        if s3.checksum_mode == "when_required":
            parts += ["--checksum-mode", "when_required"]
    return " ".join(parts)


def model_markdown(cfg: PipelineConfig, store: ArtifactStore, run_id: str, published: PublishedModel) -> str:
    name, alias = cfg.publish.model_name, cfg.publish.alias
    lines = [f"# {name}: run `{run_id}`", ""]
    if published.alias_moved:
        s3 = getattr(store, "settings", None)  # an S3 store's endpoint and checksum mode
        lines += [
            f"`{alias}` points to this run. Download and verify every file:",
            "",
            "```",
            pull_command(store.uri("").rstrip("/"), name, alias, s3),
            "```",
        ]
    else:
        lines += [f"`{alias}` was not moved to this run; its files are under `{published.run_uri}`."]
    manifest_url = browser_url(store, published.manifest_uri)
    if manifest_url:
        lines += ["", f"[manifest.json]({manifest_url}) ({expiry_note()})"]
    lines += ["", f"{published.files} files, {published.total_bytes / 1e6:,.1f} MB"]
    return "\n".join(lines) + "\n"


class TrainingProgress:
    """Step, loss, tokens/s, elapsed and ETA from the trainer's log reports (`on_log` dictionaries)."""

    def __init__(self, clock_fn=time.monotonic):
        self._clock = clock_fn
        self.started = clock_fn()
        self._first: tuple[float, int] | None = None  # (time, step) of the first report
        self.step = self.max_steps = 0
        self.loss: float | None = None
        self.tokens_per_s: float | None = None
        self.eta_s: float | None = None

    def update(self, report: dict) -> None:
        now = self._clock()
        self.step, self.max_steps = int(report["step"]), int(report["max_steps"])
        if "loss" in report:
            self.loss = float(report["loss"])
        if "train_tokens_per_second" in report:
            self.tokens_per_s = float(report["train_tokens_per_second"])
        if self._first is None:
            self._first = (now, self.step)
            runtime = report.get("train_runtime")
            per_step = runtime / self.step if runtime and self.step else None
        else:
            t0, s0 = self._first
            per_step = (now - t0) / (self.step - s0) if self.step > s0 else None
        if per_step is not None:
            self.eta_s = per_step * (self.max_steps - self.step)

    @property
    def percent(self) -> float:
        return 100.0 * self.step / max(self.max_steps, 1)

    def line(self) -> str:
        parts = [f"[train] step {self.step}/{self.max_steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        parts.append(f"elapsed {clock(self._clock() - self.started)}")
        if self.eta_s is not None:
            parts.append(f"eta {clock(self.eta_s)}")
        return " ".join(parts)

    def description(self) -> str:
        loss = "–" if self.loss is None else f"{self.loss:.4f}"
        speed = "–" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}"
        eta = "–" if self.eta_s is None else clock(self.eta_s)
        return (
            "LoRA training\n\n| step | loss | tokens/s | elapsed | ETA |\n|---|---|---|---|---|\n"
            f"| {self.step}/{self.max_steps} | {loss} | {speed} | {clock(self._clock() - self.started)} | {eta} |\n"
        )


# ---------------------------------------------------------------- Prefect artifacts


def publish_loss_curve(store: ArtifactStore, run_id: str, history: Sequence[LossPoint], plot_uri: str | None) -> None:
    from prefect.artifacts import create_markdown_artifact

    image_url = browser_url(store, plot_uri) if plot_uri else None
    create_markdown_artifact(
        loss_curve_markdown(history, run_id, image_url), key="loss-curve", description=f"run {run_id}: training loss"
    )


def publish_eval_samples(run_id: str, samples: Sequence[dict], samples_uri: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    if samples:
        create_markdown_artifact(
            samples_markdown(samples, run_id, samples_uri),
            key="eval-samples",
            description=f"run {run_id}: sample generations, base vs tuned",
        )


def publish_model_link(cfg: PipelineConfig, store: ArtifactStore, run_id: str, published: PublishedModel) -> None:
    from prefect.artifacts import create_markdown_artifact

    slug = re.sub(r"[^a-z0-9-]+", "-", cfg.publish.model_name.lower()).strip("-")
    create_markdown_artifact(
        model_markdown(cfg, store, run_id, published),
        key=f"model-{slug}",
        description=f"Merged model of run {run_id}: how to pull it",
    )


class TrainingProgressArtifact:
    """The `training-progress` bar, its description a table of step, loss, tokens/s, elapsed and ETA."""

    def __init__(self):
        from prefect.artifacts import create_progress_artifact

        self.progress = TrainingProgress()
        self.artifact_id = create_progress_artifact(
            progress=0.0, key="training-progress", description=self.progress.description()
        )

    def update(self, report: dict) -> str:
        """Record one trainer report; returns its console line."""
        from prefect.artifacts import update_progress_artifact

        self.progress.update(report)
        update_progress_artifact(
            self.artifact_id, progress=self.progress.percent, description=self.progress.description()
        )
        return self.progress.line()

    def finish(self, steps: int) -> None:
        """Training ended after `steps` optimizer steps (reported or reused from the cache)."""
        from prefect.artifacts import update_progress_artifact

        if not self.progress.max_steps:
            self.progress.step = self.progress.max_steps = steps
        update_progress_artifact(self.artifact_id, progress=100.0, description=self.progress.description())
