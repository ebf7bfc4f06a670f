"""The fused LoRA update (qlora_flow/fused_lora.py): PEFT's gradients, less saved for backward."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from qlora_flow import fused_lora
from qlora_flow.fused_lora import apply_fused_lora, keep_mask


class Attention(nn.Module):
    """Three NF4 projections reading one input, like q, k and v."""

    def __init__(self):
        super().__init__()
        for name in ("q", "k", "v"):
            layer = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(
                torch.randn(96, 64) * 0.1, requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            setattr(self, name, layer.to("cpu"))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def _peft_model(dropout: float, **extra):
    torch.manual_seed(0)
    model = get_peft_model(
        Attention(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q", "k", "v"], **extra)
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; a random B makes every gradient non-trivial
            nn.init.normal_(param, std=0.1)
    return model.train()


def _step(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), x.grad, grads


def _assert_close(first, second):
    (out1, gx1, g1), (out2, gx2, g2) = first, second
    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) == 6
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-5)


def test_without_dropout_outputs_and_gradients_equal_peft():
    model, x = _peft_model(0.0), torch.randn(2, 5, 64)
    reference = _step(model, x)
    assert apply_fused_lora(model) == 3
    assert apply_fused_lora(model) == 0  # applied once
    fused = _step(model, x)
    _assert_close(reference, fused)
    assert reference[2]["base_model.model.q.lora_A.default.weight"].abs().sum() > 0


def test_with_dropout_gradients_equal_peft_under_the_same_mask(monkeypatch):
    """PEFT's dropout with the hash's mask in place of torch's: the same numbers, so only the mask source differs."""
    model, x = _peft_model(0.25), torch.randn(2, 5, 64)
    seeds = iter(torch.tensor([[11], [22], [33]]))

    class HashDropout(nn.Module):
        def forward(self, x):
            return x * keep_mask(next(seeds), x.shape, 0.25) / 0.75

    originals = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_dropout"):
            originals[name] = module.lora_dropout["default"]
            module.lora_dropout["default"] = HashDropout()
    reference = _step(model, x)
    for name, module in model.named_modules():
        if name in originals:
            module.lora_dropout["default"] = originals[name]
    fused_seeds = iter(torch.tensor([[11], [22], [33]]))
    monkeypatch.setattr(fused_lora.torch, "randint", lambda *a, **k: next(fused_seeds))
    assert apply_fused_lora(model) == 3
    _assert_close(reference, _step(model, x))


def test_dropout_mask_keeps_the_right_share_independently_per_seed():
    shape = torch.Size([512, 1024])
    first, second = keep_mask(torch.tensor([7]), shape, 0.1), keep_mask(torch.tensor([8]), shape, 0.1)
    assert first.dtype == torch.bool and first.shape == shape
    assert abs(first.float().mean().item() - 0.9) < 0.002
    # independent masks agree on 0.9^2 + 0.1^2 of the elements; equal seeds on all of them
    assert abs((first == second).float().mean().item() - 0.82) < 0.003
    assert torch.equal(first, keep_mask(torch.tensor([7]), shape, 0.1))
    assert keep_mask(torch.tensor([7]), shape, 0.0).all()
    # neighbouring elements are not correlated (a weak hash shows runs)
    assert abs((first[:, 1:] == first[:, :-1]).float().mean().item() - 0.82) < 0.003
    # the largest seed the fused update draws: the 32-bit additions wrap, the mask keeps its statistics
    top = keep_mask(torch.tensor([2**31 - 2]), shape, 0.1)
    assert abs(top.float().mean().item() - 0.9) < 0.002
    assert abs((top[:, 1:] == top[:, :-1]).float().mean().item() - 0.82) < 0.003
    assert abs((first == top).float().mean().item() - 0.82) < 0.003


def test_element_indices_past_int32_wrap_instead_of_failing(monkeypatch):
    """Past 2**31 - 1 elements (a micro-batch of 64 x 4,096 tokens reaches it on an MLP input) the indices are
    counted in int64 and wrapped: the same masks as int32 counting below the limit, no overflow error."""
    shape = torch.Size([64, 96])
    expected = keep_mask(torch.tensor([11]), shape, 0.3)
    monkeypatch.setattr(fused_lora, "_INT32_INDEX_LIMIT", 100)
    assert torch.equal(keep_mask(torch.tensor([11]), shape, 0.3), expected)


def _saved_bytes(model, x) -> int:
    """Bytes autograd keeps for backward; a tensor saved by several functions counts once, as in memory."""
    saved = {}

    def pack(tensor):
        saved[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.clone().requires_grad_(True)).sum().backward()
    model.zero_grad()
    return sum(saved.values())


def test_saves_less_for_backward_than_peft():
    """PEFT keeps each projection's dropped-out input and mask; the fused update keeps the shared input once."""
    model, x = _peft_model(0.05), torch.randn(4, 32, 64)
    peft_bytes = _saved_bytes(model, x)
    apply_fused_lora(model)
    fused_bytes = _saved_bytes(model, x)
    assert fused_bytes < 0.6 * peft_bytes, (fused_bytes, peft_bytes)


def test_variants_eval_and_disabled_adapters_keep_peft_forward():
    dora = _peft_model(0.0, use_dora=True)
    assert apply_fused_lora(dora) == 0
    # with dropout, a fused forward in eval would drop inputs: eval must stay PEFT's deterministic output
    model, x = _peft_model(0.5), torch.randn(1, 3, 64)
    with torch.no_grad():
        peft_eval = model.eval()(x)
        with model.disable_adapter():
            peft_base = model(x)
    apply_fused_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_eval)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), peft_base)
    assert not torch.allclose(peft_eval, peft_base)  # the adapter is in play


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_in_double(p):
    torch.manual_seed(0)
    result = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([5])
    assert torch.autograd.gradcheck(lambda *t: fused_lora.LoRAUpdate.apply(*t, seed, 1.5, p), (result, x, a, b))


def test_the_training_stage_with_fused_lora_trains_peft_s_adapter(tiny_config, monkeypatch):
    """On the NF4 tiny model through tasks/train.py: with dropout 0 the fused update gives PEFT's adapter."""
    import dataclasses
    import shutil

    from conftest import make_chat_rows
    from safetensors.torch import load_file
    from test_train import _dataset

    import tasks.train
    from qlora_flow.store import LocalStore
    from tasks.prepare_base import prepare_base_model
    from tasks.train import adapter_key, train_adapter

    cfg = tiny_config.model_copy(deep=True)
    cfg.training.max_steps = 3
    cfg.lora.dropout = 0.0
    store = LocalStore(cfg.execution.store)
    data, base = _dataset(store, make_chat_rows(24)), prepare_base_model(cfg, store)

    def trained(fused: bool) -> dict[str, torch.Tensor]:
        make_plan = tasks.train.make_plan
        monkeypatch.setattr(tasks.train, "make_plan", lambda *a: dataclasses.replace(make_plan(*a), fused_lora=fused))
        ref = train_adapter(cfg, store, data, base)
        tensors = load_file(f"{ref.uri}/adapter_model.safetensors")
        shutil.rmtree(store.path / adapter_key(ref.fingerprint))  # the plan is not in the fingerprint
        monkeypatch.setattr(tasks.train, "make_plan", make_plan)
        return tensors

    calls = []
    apply = fused_lora.LoRAUpdate.apply
    monkeypatch.setattr(fused_lora.LoRAUpdate, "apply", lambda *a: calls.append(1) or apply(*a))
    peft_adapter = trained(False)
    assert not calls
    fused_adapter = trained(True)
    assert calls  # the stage's model went through the fused update
    assert peft_adapter.keys() == fused_adapter.keys()
    assert any(t.abs().sum() > 0 for name, t in fused_adapter.items() if "lora_B" in name)
    for name in peft_adapter:
        torch.testing.assert_close(fused_adapter[name], peft_adapter[name], rtol=1e-4, atol=1e-6)


def test_checkpointing_recomputes_the_same_dropout_mask():
    """Activation checkpointing runs the forward again in backward; the seed must come out the same, or the
    LoRA gradients would mix two masks. Checkpointed and plain runs from one RNG state give equal gradients."""
    from torch.utils.checkpoint import checkpoint

    model, x = _peft_model(0.3), torch.randn(2, 5, 64)
    apply_fused_lora(model)

    def grads(checkpointed: bool):
        torch.manual_seed(1234)
        inputs = x.clone().requires_grad_(True)
        out = checkpoint(model, inputs, use_reentrant=False) if checkpointed else model(inputs)
        out.square().sum().backward()
        found = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return inputs.grad, found

    plain_x, plain = grads(False)
    ckpt_x, ckpt = grads(True)
    torch.testing.assert_close(ckpt_x, plain_x)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name])
    torch.manual_seed(99)  # and a different draw gives different gradients: the mask is really in play
    other = model(x.clone()).square().sum()
    other.backward()
    assert not torch.allclose(
        model.base_model.model.q.lora_A.default.weight.grad, plain["base_model.model.q.lora_A.default.weight"]
    )
