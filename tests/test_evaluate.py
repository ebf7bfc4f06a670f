"""evaluate_adapter end to end on the tiny model: numbers checked against an independent computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import tasks.evaluate as evaluate
from qlora_flow.model_events import model_resource
from tests.conftest import make_chat_rows
from tests.test_evaluate_support import N_EVAL, run_inputs, tiny_adapter_dir  # noqa: F401  (fixtures)


def independent_loss(model, tokenizer, conversations) -> tuple[float, int]:
    """One example at a time, no padding: answer tokens are what follows the generation prompt, up to and
    including the first <|im_end|>; plain cross-entropy on each."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    total, count = 0.0, 0
    for messages in conversations:
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert full[: len(prompt)] == prompt
        answer = full[len(prompt) :]
        answer = answer[: answer.index(im_end) + 1]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        predicted = logits[len(prompt) - 1 : len(prompt) - 1 + len(answer)]
        total += torch.nn.functional.cross_entropy(predicted, torch.tensor(answer), reduction="sum").item()
        count += len(answer)
    return total / count, count


def test_report_metrics_match_independent_perplexity(tiny_config, run_inputs, tiny_model_dir, tiny_adapter_dir):
    r = run_inputs
    report = evaluate.evaluate_adapter(tiny_config, r.store, "run-a", r.data, r.base, r.adapter)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversations = [row["messages"] for row in make_chat_rows(N_EVAL, seed=1)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_loss, n_tokens = independent_loss(model, tokenizer, conversations)
    tuned_loss, _ = independent_loss(PeftModel.from_pretrained(model, tiny_adapter_dir), tokenizer, conversations)

    for metrics, loss in ((report.base_metrics, base_loss), (report.tuned_metrics, tuned_loss)):
        assert metrics["loss"] == pytest.approx(loss, rel=1e-4)
        assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
        assert metrics["assistant_tokens"] == n_tokens
        assert metrics["generation_samples"] == tiny_config.evaluation.max_generation_samples
    assert abs(base_loss - tuned_loss) > 1e-3  # the adapter really changes the model
    assert report.verdict.passed and report.verdict.reasons[0].startswith("PASS loss improvement")

    out = Path(report.uri)
    assert out == r.store.path / "runs/run-a/eval" and (out / "_COMPLETE").exists()
    stored = json.loads((out / "report.json").read_text())
    assert stored["tuned_metrics"] == report.tuned_metrics and stored["data_fingerprint"] == "data-fp"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in samples] == [c[-1]["content"] for c in conversations[:4]]
    assert [s["prompt"] for s in samples] == [c[-2]["content"] for c in conversations[:4]]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.loss_plot_uri == str(out / "loss_curve.png")
    markdown = (out / "report.md").read_text()
    assert f"| loss | {base_loss:.4f} | {tuned_loss:.4f} |" in markdown and "Quality gate: passed" in markdown


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [row["messages"][:-1] for row in make_chat_rows(3, seed=5)]
    prompts[1] = [{"role": "user", "content": "A much longer prompt, so that the batch needs left padding " * 3}]
    batched = evaluate.greedy_generate(model, tokenizer, prompts, 8, 3, [2])
    single = [evaluate.greedy_generate(model, tokenizer, [p], 8, 1, [2])[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored for the loss batches


def test_rejection_emits_event_and_artifacts(tiny_config, run_inputs, monkeypatch):
    import prefect.artifacts

    calls: dict[str, list] = {"markdown": [], "event": []}
    record_markdown = lambda md, **kw: calls["markdown"].append((md, kw))  # noqa: E731
    monkeypatch.setattr(evaluate, "create_markdown_artifact", record_markdown)
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", record_markdown)  # qlora_flow.artifacts'
    monkeypatch.setattr(evaluate, "emit_event", lambda **kw: calls["event"].append(kw))
    tiny_config.evaluation.gate.min_exact_match = 1.0
    r = run_inputs

    report = evaluate.evaluate_task.fn(tiny_config, "run-b", r.data, r.base, r.adapter)

    assert not report.verdict.passed
    em = report.tuned_metrics["exact_match"]
    assert f"FAIL exact match {em:.4f}, required >= 1.0000" in report.verdict.reasons
    [event] = calls["event"]
    assert event["event"] == "model.rejected"
    assert event["resource"]["prefect.resource.name"] == tiny_config.publish.model_name
    assert event["resource"] == model_resource(tiny_config)  # store-qualified id, alias label
    assert event["payload"]["run_id"] == "run-b" and event["payload"]["tuned_metrics"] == report.tuned_metrics
    [samples_md] = [md for md, kw in calls["markdown"] if kw["key"] == "eval-samples"]
    assert samples_md.count("- reference: ") == 4 and samples_md.count("- tuned") == 4
    assert "Quality gate: FAILED" in calls["markdown"][0][0]
    [(loss_md, loss_kw)] = [(md, kw) for md, kw in calls["markdown"] if kw["key"] == "loss-curve"]
    assert "file://" not in loss_md and f"| {r.adapter.loss_history[-1].step} | " in loss_md  # the curve's numbers

    tiny_config.evaluation.gate.min_exact_match = None
    calls["event"].clear()
    evaluate.announce(
        tiny_config,
        r.store,
        "run-b",
        report.model_copy(update={"verdict": report.verdict.model_copy(update={"passed": True})}),
    )
    assert calls["event"] == []
