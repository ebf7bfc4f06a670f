"""The quality gate: each rule's pass and fail path, and the comparison with the production model."""

from __future__ import annotations

import json

import pytest

from qlora_flow.config import GateRules
from qlora_flow.store import LocalStore
from tasks.evaluate import decide_gate, evaluate_adapter, production_metrics
from tests.test_evaluate_support import run_inputs, tiny_adapter_dir  # noqa: F401  (fixtures)

BASE = {"loss": 2.0, "exact_match": 0.10}


def test_all_rules_pass_with_numbers_in_reasons():
    rules = GateRules(min_loss_improvement=0.25, min_exact_match=0.5, max_regression_vs_production=0.02)
    verdict = decide_gate(rules, BASE, {"loss": 1.5, "exact_match": 0.80}, {"exact_match": 0.81}, "prod-7")
    assert verdict.passed
    assert verdict.reasons == [
        "PASS loss improvement 0.5000 (base 2.0000 -> tuned 1.5000) >= required 0.2500",
        "PASS exact match 0.8000, required >= 0.5000",
        "PASS exact match 0.8000 vs production run prod-7 0.8100: floor 0.7900 (allowed regression 0.0200)",
    ]


@pytest.mark.parametrize(
    ("tuned", "production", "failing"),
    [
        (
            {"loss": 1.9, "exact_match": 0.9},
            None,
            "FAIL loss improvement 0.1000 (base 2.0000 -> tuned 1.9000) < required 0.2500",
        ),
        ({"loss": 1.0, "exact_match": 0.4}, None, "FAIL exact match 0.4000, required >= 0.5000"),
        ({"loss": 1.0}, None, "FAIL exact match not measured (no generation samples), required >= 0.5000"),
        (
            {"loss": 1.0, "exact_match": 0.70},
            {"exact_match": 0.75},
            "FAIL exact match 0.7000 vs production run prod-7 0.7500: floor 0.7300 (allowed regression 0.0200)",
        ),
    ],
)
def test_each_rule_can_fail_the_gate(tuned, production, failing):
    rules = GateRules(min_loss_improvement=0.25, min_exact_match=0.5, max_regression_vs_production=0.02)
    verdict = decide_gate(rules, BASE, tuned, production, "prod-7")
    assert not verdict.passed
    assert failing in verdict.reasons
    assert sum(r.startswith("FAIL") for r in verdict.reasons) == 1


def test_no_production_model_and_disabled_rules():
    verdict = decide_gate(GateRules(), BASE, {"loss": 1.9}, None)
    assert verdict.passed
    assert verdict.reasons[-1] == "PASS no production model yet; regression check not applicable"
    rules = GateRules(min_loss_improvement=-1.0, max_regression_vs_production=None)
    assert decide_gate(rules, BASE, {"loss": 2.5}, {"exact_match": 1.0}).reasons == [
        "PASS loss improvement -0.5000 (base 2.0000 -> tuned 2.5000) >= required -1.0000"
    ]


def write_production(store: LocalStore, cfg, run_id: str, exact_match: float | None) -> None:
    store.write_json(f"models/{cfg.publish.model_name}/{cfg.publish.alias}.json", {"run_id": run_id})
    if exact_match is not None:
        store.write_json(
            f"runs/{run_id}/eval/report.json", {"tuned_metrics": {"exact_match": exact_match, "loss": 1.0}}
        )


def test_production_metrics_from_store(tiny_config, tmp_path):
    store = LocalStore(tmp_path / "s")
    assert production_metrics(store, tiny_config) == (None, None)
    write_production(store, tiny_config, "prod-1", 0.6)
    assert production_metrics(store, tiny_config) == ("prod-1", {"exact_match": 0.6, "loss": 1.0})
    write_production(store, tiny_config, "prod-2", None)
    with pytest.raises(FileNotFoundError, match="prod-2, which has no eval report"):
        production_metrics(store, tiny_config)


def test_regression_against_production_fails_the_run(tiny_config, run_inputs):
    r = run_inputs
    write_production(r.store, tiny_config, "prod-1", 0.5)
    tiny_config.evaluation.gate.max_regression_vs_production = 0.1

    report = evaluate_adapter(tiny_config, r.store, "run-c", r.data, r.base, r.adapter)

    em = report.tuned_metrics["exact_match"]
    assert em < 0.4  # random tiny model: it cannot copy the JSON answers
    assert not report.verdict.passed
    assert report.production_metrics == {"exact_match": 0.5, "loss": 1.0}
    assert (
        f"FAIL exact match {em:.4f} vs production run prod-1 0.5000: floor 0.4000 (allowed regression 0.1000)"
        in report.verdict.reasons
    )
    stored = json.loads((r.store.path / "runs/run-c/eval/report.json").read_text())
    assert stored["production_run_id"] == "prod-1" and stored["verdict"]["passed"] is False
    assert "| exact_match |" in (r.store.path / "runs/run-c/eval/report.md").read_text()
