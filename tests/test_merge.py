"""merge_adapter: the merged model equals adapter-on-base, reloads with plain transformers, and a broken merge
is caught before anything is committed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

import tasks.merge as merge
from tasks.evaluate import greedy_generate
from tests.conftest import TOKENIZER_DIR, make_chat_rows
from tests.test_evaluate_support import N_EVAL, build_adapter_dir, run_inputs, tiny_adapter_dir, write_inputs  # noqa: F401

# The random tiny model's next-token distribution is nearly flat (loss ~ ln(vocab)), so bf16 rounding of the
# merged weights flips argmax at some of its many near-ties; a trained model is far less tied.
TINY_TOP1 = 0.95


@pytest.fixture(autouse=True)
def tight_tolerance(tiny_config):
    """bf16 rounding moves the 2-layer model's logits by ~0.003, so 1e-2 still passes every correct merge
    and catches the subtle corruptions below, which the 16-bit default (sized for 30-layer models) might not."""
    tiny_config.merge.logits_atol_16bit = 1e-2


def test_merged_model_matches_adapter_and_reloads(tiny_config, run_inputs, tiny_model_dir, tiny_adapter_dir):
    tiny_config.merge.min_top1_agreement = TINY_TOP1
    r = run_inputs
    merged = merge.merge_adapter(tiny_config, r.store, "run-m", r.base, r.adapter, data=r.data)

    out = Path(merged.uri)
    assert out == r.store.path / "runs/run-m/model" and (out / "_COMPLETE").exists()
    assert merged.dtype == "bfloat16"  # save_dtype auto: the base is stored in bf16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out / "adapter_config.json").exists()
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    v = merged.verification
    assert v["verified"] is True and v["prompts"] == 2
    assert 0 < v["reloaded_max_abs_logit_diff"] <= tiny_config.merge.logits_atol
    assert v["reloaded_top1_agreement"] >= TINY_TOP1 and v["reloaded_greedy_mismatches"] == 0
    assert v["stops_at_end_of_turn"] is True and v["end_of_turn_in_training_mask"] is True
    assert json.loads((out / "verification.json").read_text()) == v

    # The weights are base + scaling * B @ A, rounded once to bf16.
    base_sd, merged_sd = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    adapter_sd = load_file(tiny_adapter_dir / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = 2.0 * adapter_sd[f"{prefix}.lora_B.weight"] @ adapter_sd[f"{prefix}.lora_A.weight"]  # alpha/r = 8/4
    expected = (base_sd["model.layers.0.self_attn.q_proj.weight"].float() + delta).to(torch.bfloat16)
    assert torch.equal(merged_sd["model.layers.0.self_attn.q_proj.weight"], expected)

    # Plain transformers, no peft: the same greedy answers as the adapter on the base.
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in GenerationConfig.from_pretrained(out).eos_token_id
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(TOKENIZER_DIR).chat_template
    prompts = [row["messages"][:-1] for row in make_chat_rows(N_EVAL, seed=1)[:2]]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tiny_adapter_dir
    )
    assert greedy_generate(reloaded, tokenizer, prompts, 16, 2, [im_end]) == greedy_generate(
        reference, tokenizer, prompts, 16, 2, [im_end]
    )

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == r.base.model_id and meta["library_name"] == "transformers"
    assert meta["qlora_flow"]["data_fingerprint"] == "data-fp"
    assert meta["qlora_flow"]["lora"]["r"] == 4 and meta["qlora_flow"]["lora"]["alpha"] == 8
    assert meta["qlora_flow"]["training"]["steps"] == 6
    assert meta["qlora_flow"]["merge_verification"]["reloaded_greedy_mismatches"] == 0


def _noisy(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        weight = model.model.layers[1].mlp.down_proj.weight
        weight += torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)).to(weight.dtype) * 0.2
    return model


def test_corrupted_merge_is_caught_before_commit(tiny_config, run_inputs, monkeypatch):
    tiny_config.evaluation.max_new_tokens = 4  # the logits already tell
    original = BaseTuner.merge_and_unload
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kw: _noisy(original(self, **kw)))
    with pytest.raises(merge.MergeVerificationError, match=r"reloaded: max \|logit diff\| .* > atol 0.01"):
        merge.merge_adapter(
            tiny_config, run_inputs.store, "run-x", run_inputs.base, run_inputs.adapter, data=run_inputs.data
        )
    assert not run_inputs.store.is_complete("runs/run-x/model")


def test_unmerged_base_is_caught(tiny_config, run_inputs, monkeypatch):
    """The example's bug: the adapter never reaches the saved weights."""
    tiny_config.evaluation.max_new_tokens = 4
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kw: self.unload())
    with pytest.raises(merge.MergeVerificationError, match=r"reloaded: max \|logit diff\|"):
        merge.merge_adapter(
            tiny_config, run_inputs.store, "run-u", run_inputs.base, run_inputs.adapter, data=run_inputs.data
        )


def test_corrupted_saved_file_is_caught_by_reload(tiny_config, run_inputs, monkeypatch):
    tiny_config.merge.min_top1_agreement = TINY_TOP1
    tiny_config.evaluation.max_new_tokens = 4
    original = merge.PreTrainedTokenizerBase.save_pretrained

    def save_then_corrupt(self, directory, *args, **kwargs):  # runs right after the weights were written
        path = Path(directory) / "model.safetensors"
        tensors = load_file(path)
        name = "model.layers.1.mlp.down_proj.weight"
        tensors[name] = (tensors[name].float() + 0.2 * torch.randn(tensors[name].shape)).to(torch.bfloat16)
        save_file(tensors, path, metadata={"format": "pt"})
        return original(self, directory, *args, **kwargs)

    monkeypatch.setattr(merge.PreTrainedTokenizerBase, "save_pretrained", save_then_corrupt)
    with pytest.raises(merge.MergeVerificationError, match=r"reloaded: max \|logit diff\|"):
        merge.merge_adapter(
            tiny_config, run_inputs.store, "run-s", run_inputs.base, run_inputs.adapter, data=run_inputs.data
        )


def build_stopping_model(dest: Path) -> Path:
    """A tiny Llama that answers <|im_end|> at once: a large attention-output bias on one hidden dimension
    of the last layer, read out only by the lm_head row of <|im_end|>."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        tie_word_embeddings=False,
        eos_token_id=im_end,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[-1].self_attn.o_proj.bias.zero_()
        model.model.layers[-1].self_attn.o_proj.bias[7] = 50.0
        model.lm_head.weight[im_end, 7] = 1.0
    model.to(torch.bfloat16).save_pretrained(dest)
    GenerationConfig(eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def test_generation_stops_at_end_of_turn_and_missing_eos_is_caught(tiny_config, tmp_path, monkeypatch):
    from qlora_flow.config import ALL_PROJECTIONS

    model_dir = build_stopping_model(tmp_path / "stopper")
    inputs = write_inputs(
        tiny_config, model_dir, build_adapter_dir(model_dir, tmp_path / "stopper-adapter", ALL_PROJECTIONS)
    )
    merged = merge.merge_adapter(tiny_config, inputs.store, "run-eos", inputs.base, inputs.adapter, data=inputs.data)
    assert (
        merged.verification["answers_ended_by_end_of_turn"] == 2 and merged.verification["stops_at_end_of_turn"] is True
    )

    # A generation config that forgets <|im_end|>: the saved model would talk past the end of its turn.
    monkeypatch.setattr(
        merge, "generation_config_for", lambda base_dir, tok: GenerationConfig(eos_token_id=[0], pad_token_id=2)
    )
    with pytest.raises(merge.MergeVerificationError, match="generated past the end-of-turn token"):
        merge.merge_adapter(tiny_config, inputs.store, "run-eos2", inputs.base, inputs.adapter, data=inputs.data)


def test_stop_check_on_hand_made_answers():
    probe = lambda ids: merge.Probe([1], ids, torch.zeros(1))  # noqa: E731
    assert merge.stops_at_end_of_turn([probe([5, 6, 2]), probe([5, 6, 7, 8])], [2], 4) == (True, 1)
    assert merge.stops_at_end_of_turn([probe([5, 2, 2, 2])], [2], 4) == (False, 1)  # ran past its end of turn
    assert merge.stops_at_end_of_turn([probe([5, 6])], [2], 4) == (False, 0)  # ended early without one


def test_verification_precision_follows_free_memory(tiny_model_dir, monkeypatch):
    """auto: float32 only when a float32 copy (plus, on the CPU, the 16-bit shards being read) fits with 25%
    to spare, so verifying never needs more than the model's saved size plus a margin."""
    size = merge.model_bytes(tiny_model_dir)  # bf16 on disk
    assert size > 0
    for device, needed in (("cpu", 3 * size), ("cuda", 2 * size)):
        monkeypatch.setattr(merge, "free_memory_bytes", lambda device: int(needed * 1.25))
        assert merge.resolve_verify_dtype("auto", torch.bfloat16, tiny_model_dir, device) == torch.float32
        monkeypatch.setattr(merge, "free_memory_bytes", lambda device: int(needed * 1.25) - 1)
        assert merge.resolve_verify_dtype("auto", torch.bfloat16, tiny_model_dir, device) == torch.bfloat16
    assert merge.resolve_verify_dtype("float32", torch.bfloat16, tiny_model_dir, "cpu") == torch.float32
    assert merge.resolve_verify_dtype("saved", torch.float32, tiny_model_dir, "cpu") == torch.float32


def test_verification_in_the_saved_dtype_passes_a_good_merge_and_catches_a_missing_one(
    tiny_config, run_inputs, monkeypatch
):
    tiny_config.merge.verify_dtype = "saved"
    tiny_config.merge.min_top1_agreement = TINY_TOP1
    tiny_config.evaluation.max_new_tokens = 4
    r = run_inputs
    merged = merge.merge_adapter(tiny_config, r.store, "run-b", r.base, r.adapter, data=r.data)
    v = merged.verification
    assert merged.dtype == "bfloat16" and v["compute_dtype"] == "bfloat16"
    assert (
        v["reloaded_max_abs_logit_diff"] <= tiny_config.merge.logits_atol_16bit and v["reloaded_greedy_mismatches"] == 0
    )

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kw: self.unload())
    with pytest.raises(merge.MergeVerificationError, match=r"reloaded: max \|logit diff\|"):
        merge.merge_adapter(tiny_config, r.store, "run-b2", r.base, r.adapter, data=r.data)
