"""Padding-free packing must not let one example attend to another: packed loss == unpacked loss."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_loss_as_separate_examples(tiny_model_dir, attn):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    examples = [torch.randint(10, 1000, (n,), generator=gen).tolist() for n in (7, 19, 12)]

    # Unpacked: each example alone, token losses summed.
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in examples:
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1

    # Packed the way TRL's padding-free collator does it: one row, position_ids restart per example.
    # transformers infers the example boundaries from position_ids only without a KV cache, which is
    # why SFTTrainer.compute_loss passes use_cache=False; with a cache the examples would attend to
    # each other.
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": ids} for ids in examples])
    assert batch["input_ids"].shape == (1, sum(len(e) for e in examples))
    assert "attention_mask" not in batch or batch["attention_mask"] is None
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
        )
    # labels mark each example's first token -100, so the packed mean is over the same tokens
    assert (batch["labels"] != -100).sum().item() == count
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)

    # Control: the same row without position_ids attends across examples and the loss differs.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.item()
    assert abs(leaky - total / count) > 1e-4
