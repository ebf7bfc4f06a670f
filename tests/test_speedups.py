"""Per-layer torch.compile: same numbers as eager, and packed batches of changing length do not
recompile per batch (measured on the GPU: a static-shape compile recompiled on every new packed length)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_flow.speedups import _CpuEmbedding, compile_decoder_layers, decoder_layers, input_embedding_on_cpu


def _llama(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def _peft_model(model: LlamaForCausalLM | None = None):
    lora = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model if model is not None else _llama(), lora)


def _loss_and_grad(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.grad.clone()
    model.zero_grad()
    return loss.item(), grad


def test_input_embedding_in_cpu_memory_gives_the_same_loss_and_gradients_and_stays_there():
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = _loss_and_grad(_peft_model(), ids)
    model = _llama()
    table = model.get_input_embeddings().weight
    assert input_embedding_on_cpu(model)
    peft_model = _peft_model(model)
    peft_model.enable_input_require_grads()  # what the Trainer does for checkpointing on a frozen base
    loss, grad = _loss_and_grad(peft_model, ids)
    assert loss == pytest.approx(reference[0], abs=1e-6) and torch.allclose(grad, reference[1], atol=1e-6)
    # Frozen like the rest of the base: PEFT cannot see the hidden table, and a trainable one cost 25% of the
    # 7 GiB profile's speed on the GPU (a dense 1 GiB gradient built on the CPU every backward).
    assert not table.requires_grad and table.grad is None
    # the Trainer moves the model to its device; the table must not follow (meta stands in for cuda here)
    peft_model.to("meta")
    assert model.get_input_embeddings().weight is table and table.device.type == "cpu"
    assert "model.embed_tokens.weight" not in model.state_dict()


def test_rows_staged_for_the_gpu_copy_match_the_lookup_and_reuse_one_buffer(monkeypatch):
    # Page-locking needs a CUDA driver; on this CPU-only machine the buffer is ordinary memory.
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    table = torch.nn.Embedding(256, 8)
    cpu_embedding = _CpuEmbedding(table, torch.device("cpu"), pinned=True)
    assert not cpu_embedding.weight.requires_grad
    small, large = (
        torch.tensor([[3, 7, 255]]),
        torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2)),
    )
    first = cpu_embedding._staged_rows(large)
    assert first.shape == (2, 5, 8) and torch.equal(first, table(large).detach())
    buffer = cpu_embedding._staging.data_ptr()
    second = cpu_embedding._staged_rows(small)  # smaller: same buffer
    assert torch.equal(second, table(small).detach()) and cpu_embedding._staging.data_ptr() == buffer
    third = cpu_embedding._staged_rows(torch.randint(0, 256, (4, 9)))  # larger: the buffer grows
    assert third.shape == (4, 9, 8) and cpu_embedding._staging.numel() == 4 * 9 * 8


def test_a_tied_input_embedding_is_the_lm_head_and_is_left_in_place():
    model = _llama(tied=True)
    embedding = model.get_input_embeddings()
    assert not input_embedding_on_cpu(model)
    assert model.get_input_embeddings() is embedding


def test_finds_the_decoder_layers_inside_a_peft_model():
    model = _peft_model()
    layers = decoder_layers(model)
    assert len(layers) == 3 and type(layers[0]).__name__ == "LlamaDecoderLayer"


@pytest.mark.slow
def test_compiled_layers_match_eager_and_compile_at_most_twice_over_changing_lengths():
    model = _peft_model()
    batches = [torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in (16, 24, 40, 56)]
    eager = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        eager.append(
            (loss.item(), model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.grad.clone())
        )
        model.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(model) == 3
    graphs = []
    for ids, (eager_loss, eager_grad) in zip(batches, eager):
        loss = model(input_ids=ids, labels=ids).loss
        graphs.append(counters["stats"]["unique_graphs"])
        loss.backward()
        grad = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.grad
        assert loss.item() == pytest.approx(eager_loss, abs=1e-5)
        torch.testing.assert_close(grad, eager_grad, atol=1e-5, rtol=1e-4)
        model.zero_grad()
    # a static graph per layer for the first length, a dynamic-shape one at the second, then no more
    assert graphs[0] <= 3 and graphs[1] == graphs[2] == graphs[3] <= 6


def test_checkpointed_compiled_layers_are_one_graph_with_the_same_numbers():
    """The stage's budgeted GPU recipe: gradient checkpointing around compiled layers, fused LoRA with dropout.
    A forward side effect inside the checkpointed layer (transformers 5.25's kernel routing sets a global)
    made dynamo give up on the layer: zero graphs, every layer eager, the 16 and 7 GiB plans 1.25x slower."""
    from peft import LoraConfig, get_peft_model

    from qlora_flow.fused_lora import apply_fused_lora

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1, task_type="CAUSAL_LM")
    model = get_peft_model(_llama(), lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    assert apply_fused_lora(model) > 0
    model.train()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)  # the fused update draws its mask seeds from torch's generator
    expected = _loss_and_grad(model, ids)
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(model) == 3
    torch.manual_seed(5)
    loss, grad = _loss_and_grad(model, ids)
    assert not counters["graph_break"], list(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one graph, shared by the three layers
    assert loss == pytest.approx(expected[0], abs=1e-5)
    torch.testing.assert_close(grad, expected[1], atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
