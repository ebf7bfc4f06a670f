"""A second training backend for the tests, registered as `fake` by tests/test_training_backends.py.

It keeps the recipe contract (qlora_flow/recipe.py's docstring) without training: an untrained PEFT adapter
(lora_B is zero, so the tuned model answers exactly like the base) with the base's tokenizer, one checkpoint
reported through on_checkpoint, and statistics of zero steps. The tiny model on the CPU, in a second.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from qlora_flow.config import PipelineConfig
from qlora_flow.recipe import RecipeInputs, TrainingStats
from qlora_flow.training_plan import TrainingPlan


def train_lora(
    cfg: PipelineConfig,
    plan: TrainingPlan,
    inputs: RecipeInputs,
    on_checkpoint: Callable[[str], None] = lambda name: None,
    on_log: Callable[[dict], None] | None = None,
) -> TrainingStats:
    from peft import LoraConfig, get_peft_model

    from qlora_flow.hardware import resolve_compute_dtype
    from qlora_flow.models import load_full_precision_model, load_tokenizer

    model = load_full_precision_model(inputs.base_dir, resolve_compute_dtype(inputs.compute_dtype, inputs.device))
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules)
    peft_model = get_peft_model(model, lora)
    checkpoint = inputs.checkpoint_dir / "checkpoint-0"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"num_input_tokens_seen": 0}))
    on_checkpoint(checkpoint.name)
    peft_model.save_pretrained(inputs.adapter_dir)
    load_tokenizer(inputs.base_dir).save_pretrained(inputs.adapter_dir)
    if on_log is not None:
        on_log({"step": 0, "max_steps": 0})
    return TrainingStats(
        trainable_parameters=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        steps=0,
        loss_history=[],
        tokens_seen=0,
        train_seconds=0.0,
        tokens_per_second=0.0,
    )
