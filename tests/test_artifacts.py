"""What the UI artifacts say: the loss curve's numbers, links a browser can open (presigned on S3, never
file://), the exact pull command, progress with step/loss/tokens/s/ETA, sample tables that fit."""

from __future__ import annotations

import itertools
import shlex
from urllib.request import urlopen

from s3server import moto_server, s3env  # noqa: F401  (fixtures)

from qlora_flow import artifacts
from qlora_flow.config import load_config
from qlora_flow.refs import LossPoint, PublishedModel
from qlora_flow.store import LocalStore


def _history(n: int) -> list[LossPoint]:
    return [LossPoint(step=i, loss=round(4.0 / i, 4)) for i in range(1, n + 1)]


def test_loss_table_is_compact_and_keeps_first_and_last_step():
    markdown = artifacts.loss_curve_markdown(_history(137), "run-a")
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert len(rows) == artifacts.LOSS_TABLE_ROWS
    assert rows[0] == "| 1 | 4.0000 |" and rows[-1] == "| 137 | 0.0292 |"
    steps = [int(r.split("|")[1]) for r in rows]
    assert steps == sorted(steps) and max(b - a for a, b in itertools.pairwise(steps)) <= 8  # evenly spread
    assert "137 logged steps, loss 4.0000 → 0.0292" in markdown
    assert "eval loss" not in markdown  # no column when nothing was evaluated during training
    assert "file://" not in markdown and "](" not in markdown  # local store: numbers, no link


def test_eval_loss_column_appears_when_logged_and_short_history_is_whole():
    history = [LossPoint(step=1, loss=2.0), LossPoint(step=2, loss=1.5, eval_loss=1.7)]
    markdown = artifacts.loss_curve_markdown(history, "run-a")
    assert "| 1 | 2.0000 | |" in markdown and "| 2 | 1.5000 | 1.7000 |" in markdown


def test_samples_are_blocks_with_texts_cut_and_marked():
    long = "word " * 80 + "\nsecond line"
    samples = [
        {
            "index": 0,
            "prompt": long,
            "reference": '{"a": 1}',
            "base": "",
            "tuned": '{"a": 1}',
            "tuned_exact_match": True,
        },
        {
            "index": 1,
            "prompt": "p",
            "reference": "r",
            "base": "uses `ticks`",
            "tuned": "x\ny",
            "tuned_exact_match": False,
        },
    ]
    markdown = artifacts.samples_markdown(samples, "run-a", "/store/runs/run-a/eval/samples.jsonl")
    cut = artifacts.truncate(long)
    assert len(cut) == artifacts.SAMPLE_CHARS and cut.endswith("…") and "\n" not in cut
    assert f"**1.** `{cut}`" in markdown
    assert '- tuned (exact match): `{"a": 1}`' in markdown and "- base: *(empty)*" in markdown
    assert "- tuned: `x y`" in markdown and "- base: `` uses `ticks` ``" in markdown
    assert "2 of 2 samples" in markdown and "/store/runs/run-a/eval/samples.jsonl" in markdown
    many = artifacts.samples_markdown([{**samples[1], "index": i} for i in range(50)], "r", "u")
    assert f"{artifacts.SAMPLES_SHOWN} of 50 samples" in many and f"**{artifacts.SAMPLES_SHOWN + 1}.**" not in many


def test_training_progress_reports_rate_and_eta():
    now = [100.0]
    progress = artifacts.TrainingProgress(clock_fn=lambda: now[0])
    now[0] = 110.0
    progress.update({"step": 2, "max_steps": 40, "loss": 1.25, "train_runtime": 8.0, "train_tokens_per_second": 3100.4})
    assert progress.eta_s == 4.0 * 38  # 8 s over 2 steps, 38 to go
    now[0] = 130.0
    progress.update({"step": 12, "max_steps": 40, "loss": 0.41, "train_tokens_per_second": 3090})
    assert progress.eta_s == 2.0 * 28  # 20 s for the last 10 steps
    assert progress.line() == "[train] step 12/40 loss 0.4100 3,090 tok/s elapsed 0:00:30 eta 0:00:56"
    assert "| 12/40 | 0.4100 | 3,090 | 0:00:30 | 0:00:56 |" in progress.description()
    assert progress.percent == 30.0


def test_local_model_artifact_is_the_exact_pull_command(tmp_path):
    cfg = load_config(None, {"publish.model_name": "extractor", "execution.store": str(tmp_path / "store")})
    store = LocalStore(tmp_path / "store")
    published = PublishedModel(
        run_uri=store.uri("runs/r1"),
        manifest_uri=store.uri("runs/r1/manifest.json"),
        model_uri=store.uri("runs/r1/model"),
        alias_uri=store.uri("models/extractor/production.json"),
        alias_moved=True,
        files=3,
        total_bytes=2_500_000,
    )
    markdown = artifacts.model_markdown(cfg, store, "r1", published)
    command = next(line for line in markdown.splitlines() if line.startswith("qlora-flow pull"))
    assert shlex.split(command) == [
        "qlora-flow",
        "pull",
        "extractor:production",
        "./extractor",
        "--store",
        str(store.root),
    ]
    assert "file://" not in markdown and "2.5 MB" in markdown
    not_moved = artifacts.model_markdown(cfg, store, "r1", published.model_copy(update={"alias_moved": False}))
    assert "qlora-flow pull" not in not_moved and "was not moved" in not_moved


def test_s3_links_are_presigned_urls_a_browser_can_open(s3env, tmp_path):
    store = s3env.store(tmp_path / "cache")
    png = b"\x89PNG\r\n\x1a\n" + b"curve" * 100
    store.write_bytes("runs/r1/eval/loss_curve.png", png)
    url = artifacts.browser_url(store, store.uri("runs/r1/eval/loss_curve.png"))
    assert url.startswith("http") and "X-Amz-Expires=604800" in url
    with urlopen(url, timeout=10) as response:  # no credentials: the signature in the URL is the permission
        assert response.read() == png
    markdown = artifacts.loss_curve_markdown(_history(5), "r1", url)
    assert f"![training loss curve]({url})" in markdown and "link valid for 7 days" in markdown

    manifest_uri = store.uri("runs/run-s3/manifest.json")
    store.write_bytes("runs/run-s3/manifest.json", b'{"run_id": "run-s3"}')
    published = PublishedModel(
        run_uri=store.uri("runs/run-s3"),
        manifest_uri=manifest_uri,
        model_uri=store.uri("runs/run-s3/model"),
        alias_uri=None,
        alias_moved=True,
        files=1,
        total_bytes=10,
    )
    cfg = load_config(None, {"publish.model_name": "extractor"})
    markdown = artifacts.model_markdown(cfg, store, "run-s3", published)
    command = next(line for line in markdown.splitlines() if line.startswith("qlora-flow pull"))
    assert f"--store {store.root}" in command and f"--endpoint-url {store.settings.endpoint_url}" in command
    manifest_url = markdown.split("[manifest.json](")[1].split(")")[0]
    with urlopen(manifest_url, timeout=10) as response:
        assert response.read() == b'{"run_id": "run-s3"}'
    assert artifacts.browser_url(LocalStore(tmp_path / "local"), str(tmp_path / "local" / "x.png")) is None
