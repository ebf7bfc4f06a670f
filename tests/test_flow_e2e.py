"""The whole flow on the tiny model under a Prefect test server: every stage real, outputs checked."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _greedy(model, tokenizer, messages: list[dict], max_new_tokens: int = 12) -> list[int]:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, prompt["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_pipeline_end_to_end_publishes_a_verified_model(prefect_server, tiny_config, tmp_path):
    from peft import PeftModel

    from flows.pipeline import qlora_pipeline

    cfg = tiny_config
    cfg.execution.isolate_gpu_stages = True  # the production path: training in a child process
    cfg.export.gguf = ["f16"]
    state = qlora_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.status == "published"

    # data: split counts add up, nothing rejected
    assert result.data.n_train + result.data.n_eval == 40 and result.data.n_rejected == 0
    # training: 6 steps with a loss per step, adapter on disk
    assert result.adapter.steps == 6 and len(result.adapter.loss_history) == 6
    assert (Path(result.adapter.uri) / "adapter_model.safetensors").is_file()
    # evaluation: both models scored on the same split
    for metrics in (result.report.base_metrics, result.report.tuned_metrics):
        assert {"loss", "perplexity", "exact_match"} <= metrics.keys()
        assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-4)
    assert result.report.verdict.passed

    # merge: a plain transformers load of the merged model matches adapter-on-16-bit-base greedy output
    merged_dir = Path(result.merged.uri)
    assert list(merged_dir.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(result.base.full_precision_uri, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, result.adapter.uri)
    eos = merged.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    prompt = [{"role": "user", "content": "Record 1: Ada is 30 years old."}]
    assert _greedy(merged, tokenizer, prompt) == _greedy(adapted, tokenizer, prompt)

    # publish: manifest lists every model file with its checksum, alias names this run
    manifest = json.loads(Path(result.published.manifest_uri).read_text())
    alias = json.loads(Path(result.published.alias_uri).read_text())
    assert alias["run_id"] == result.run_id
    listed = {f["path"] for f in manifest["files"]}
    assert any(p.startswith("model/") and p.endswith(".safetensors") for p in listed)
    assert {"gguf/model-f16.gguf", "adapter/README.md"} <= listed and result.gguf.verification["f16"][
        "greedy_identical"
    ] == 2
    assert manifest["lineage"]["data"]["fingerprint"] == result.data.fingerprint
    assert manifest["lineage"]["base_model"]["fingerprint"] == result.base.fingerprint

    # the training child's lines reached the flow run's logs in the Prefect API: its plan and each step's loss
    messages = _flow_run_log_messages(state.state_details.flow_run_id)
    assert any("training plan: {" in m and "'per_device_batch_size'" in m for m in messages), messages[-20:]
    assert any(m.startswith("[train] step 6/6 loss ") for m in messages), messages[-20:]

    # an unchanged re-run reuses the trained adapter instead of training again
    second = qlora_pipeline(cfg, return_state=True).result()
    assert second.adapter == result.adapter
    assert second.run_id != result.run_id


def _flow_run_log_messages(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs travel to the server in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


@pytest.mark.slow
def test_gate_failure_ends_rejected_without_moving_alias(prefect_server, tiny_config):
    from flows.pipeline import CandidateRejected, qlora_pipeline
    from qlora_flow.store import LocalStore

    cfg = tiny_config
    cfg.evaluation.gate.min_exact_match = 1.0  # a random tiny model cannot reach it
    state = qlora_pipeline(cfg, return_state=True)
    assert state.is_failed() and state.name == "Rejected"  # red in the runs list, FAILED in `prefect flow-run ls`
    assert "exact" in state.message.lower()
    rejected = state.result(raise_on_failure=False)  # what a worker's engine logs: the reasons, no TypeError
    assert isinstance(rejected, CandidateRejected) and str(rejected) == state.message
    result = rejected.result
    assert result.status == "rejected" and result.merged is None and result.published is None
    assert pickle.loads(pickle.dumps(rejected)).result == result  # persisted with the state's data
    with pytest.raises(CandidateRejected, match="quality gate failed"):
        state.result()  # as the engine a worker starts asks for it after the run
    store = LocalStore(cfg.execution.store)
    assert not store.exists(f"models/{cfg.publish.model_name}/{cfg.publish.alias}.json")


def test_bad_data_fails_the_run_before_the_base_is_prepared(prefect_server, tiny_config, tmp_path, monkeypatch):
    """A first run downloads and quantizes the base for minutes; a flow cannot stop that stage once it runs in
    one of its threads, so bad data must fail the run before base preparation starts, not after it."""
    import time

    import tasks.prepare_base
    from flows.pipeline import qlora_pipeline

    started_base = []
    monkeypatch.setattr(
        tasks.prepare_base, "prepare_base_model", lambda *a: started_base.append(time.sleep(60)) or pytest.fail()
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join('{"messages": [{"role": "user", "content": "hi"}]}\n' for _ in range(20)))
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.train_path = str(bad)
    cfg.data.eval_path = None

    began = time.monotonic()
    state = qlora_pipeline(cfg, return_state=True)
    assert state.is_failed() and "dataset validation failed" in state.message
    assert started_base == [] and time.monotonic() - began < 45
