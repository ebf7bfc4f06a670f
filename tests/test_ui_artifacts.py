"""Every artifact of a real run, as an operator sees it: through the API, `prefect flow-run ls` and the Prefect
UI in headless Chromium (screenshots under test-output/). A tiny pipeline runs twice against a real
`prefect server start`: published by the pipeline, then retrained by the scheduled flow with another
learning rate and a gate it cannot pass (rejected), then the scheduled flow again (unchanged)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHROMIUM, build_tiny_model_dir, launch_chromium, make_chat_rows, tiny_overrides
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from deployments.local import api_of, free_port, prefect_server
from qlora_flow import artifacts
from qlora_flow.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "test-output"
MODEL = "ui-extractor"
WINDOW = 1440  # px: a laptop browser window


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from flows.pipeline import qlora_pipeline
    from flows.retrain import scheduled_retrain

    home = tmp_path_factory.mktemp("ui")
    data = home / "train.jsonl"
    rows = make_chat_rows(40)
    for row in rows:  # long prompts: the sample table must still fit the window
        row["messages"][0]["content"] += " Please read the whole note carefully before answering." * 5
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = {
        **tiny_overrides(home, data, build_tiny_model_dir(home / "tiny-model")),
        # room for the long prompts, and sample answers long enough to fill the table
        "training.max_seq_length": 256,
        "evaluation.max_generation_samples": 3,
        "evaluation.max_new_tokens": 40,
        "merge.verify_prompts": 1,
        "publish.model_name": MODEL,
    }
    port = free_port()
    with prefect_server(home / "prefect", port, home / "server.log") as env, api_of(env):
        published = qlora_pipeline(load_config(None, overrides), return_state=True)
        strict = {**overrides, "training.learning_rate": 2e-3, "evaluation.gate.min_exact_match": 1.0}
        rejected = scheduled_retrain(load_config(None, strict), return_state=True)
        unchanged = scheduled_retrain(load_config(None, overrides), return_state=True)
        with get_client(sync_client=True) as client:
            found = {
                name: (
                    client.read_flow_run(state.state_details.flow_run_id),
                    _artifacts(client, state.state_details.flow_run_id),
                )
                for name, state in (("published", published), ("rejected", rejected), ("unchanged", unchanged))
            }
        yield {"env": env, "port": port, "home": home, **found}


def _artifacts(client, flow_run_id) -> dict:
    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    return {a.key: a for a in found if a.key}


def test_artifacts_say_what_happened_with_links_that_work(runs, tmp_path):
    run, found = runs["published"]
    assert run.state.type.value == "COMPLETED", run.state.message
    assert {"training-progress", "loss-curve", "eval-comparison", "eval-samples", f"model-{MODEL}"} <= set(found)
    for artifact in found.values():
        assert "file://" not in json.dumps(artifact.data) + (artifact.description or ""), artifact.key

    progress = found["training-progress"]
    assert progress.data == 100.0
    assert "| 6/6 | " in progress.description and "tokens/s" in progress.description and "ETA" in progress.description

    loss = found["loss-curve"].data
    assert "| step | loss |" in loss and "| 6 | " in loss and "6 logged steps" in loss

    samples_md = found["eval-samples"].data
    samples = runs["home"] / "store" / "runs"
    full = [json.loads(line) for p in samples.glob("*/eval/samples.jsonl") for line in p.read_text().splitlines()]
    longest = max(full, key=lambda s: len(s["prompt"]))["prompt"]
    assert len(longest) > artifacts.SAMPLE_CHARS  # the stored report keeps the whole text...
    assert artifacts.truncate(longest) in samples_md and longest not in samples_md  # ...the artifact a cut one

    # the model artifact's command, as printed, downloads and verifies the model
    model_md = found[f"model-{MODEL}"].data
    command = shlex.split(next(line for line in model_md.splitlines() if line.startswith("qlora-flow pull")))
    command[3] = str(tmp_path / "pulled")
    pull = subprocess.run(
        [sys.executable, "-m", "qlora_flow.cli", *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert pull.returncode == 0, pull.stderr
    assert (tmp_path / "pulled" / "config.json").exists() and (tmp_path / "pulled" / "manifest.json").exists()


def _flow_run_ls(runs, *args: str) -> dict[str, str]:
    ls = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), "flow-run", "ls", *args],
        env={**runs["env"], "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ls.returncode == 0, ls.stderr
    return {line.split("│")[1].strip(): line for line in ls.stdout.splitlines() if line.count("│") > 4}


def test_rejected_and_unchanged_runs_are_told_apart_in_flow_run_ls(runs):
    (published, _), (rejected, _), (unchanged, _) = runs["published"], runs["rejected"], runs["unchanged"]
    # the scheduled flow ends in its pipeline subflow's state: a rejected candidate is not a green run
    assert rejected.state.type.value == "FAILED" and rejected.state.name == "Rejected"
    assert "quality gate failed" in rejected.state.message
    assert unchanged.state.type.value == "COMPLETED" and unchanged.state.name == "Unchanged"
    table = _flow_run_ls(runs)
    assert "FAILED" in table[str(rejected.id)] and "COMPLETED" in table[str(published.id)], table
    assert set(_flow_run_ls(runs, "--flow-name", "qlora-retrain", "--state", "Rejected")) == {str(rejected.id)}
    assert set(_flow_run_ls(runs, "--state", "Unchanged")) == {str(unchanged.id)}


def test_every_artifact_renders_in_chromium_and_fits_the_window(runs):
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed: apt-get install -y chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    SCREENSHOTS.mkdir(exist_ok=True)
    _, found = runs["published"]
    base = f"http://127.0.0.1:{runs['port']}"
    expected_text = {
        "training-progress": "tokens/s",
        "loss-curve": "logged steps",
        "eval-comparison": "Quality gate: passed",
        "eval-samples": "reference:",
        f"model-{MODEL}": "qlora-flow pull",
        f"published-{MODEL}": "now points to this run",
        "data-validation": "rows",
    }
    with playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": WINDOW, "height": 1000})
            for key, text in expected_text.items():
                page.goto(f"{base}/artifacts/artifact/{found[key].id}", wait_until="networkidle")
                page.get_by_text(text).first.wait_for(timeout=60_000)
                page.screenshot(path=str(SCREENSHOTS / f"artifact-{key}.png"), full_page=True)
                body = page.inner_text("body")
                assert "file://" not in body and not page.locator("a[href^='file:']").count(), key
                width = page.evaluate("document.documentElement.scrollWidth")
                assert width <= WINDOW, f"{key} is {width}px wide"
                # tables scroll inside their box rather than widen the page: nothing may stick out of it
                overflow = page.evaluate(
                    "Math.max(0, ...[...document.querySelectorAll('table, li, p')]"
                    ".map(e => e.scrollWidth - e.parentElement.clientWidth))"
                )
                assert overflow <= 0, f"{key}: content {overflow}px wider than its box"
            # the loss table renders as a table (its last step's row is there)
            page.goto(f"{base}/artifacts/artifact/{found['loss-curve'].id}", wait_until="networkidle")
            page.locator("table").first.wait_for(timeout=30_000)
            assert page.locator("table tr").count() == 1 + 6  # header + one row per logged step

            # the runs list: the rejected run's badge reads Rejected, in the failed colour
            rejected, _ = runs["rejected"]
            page.goto(f"{base}/runs/flow-run/{rejected.id}", wait_until="networkidle")
            badge = page.locator(".state-badge", has_text="Rejected").first
            badge.wait_for(timeout=60_000)
            assert "state--failed" in (badge.get_attribute("class") or "")
            page.screenshot(path=str(SCREENSHOTS / "flow-run-rejected.png"), full_page=True)
        finally:
            browser.close()
