"""The torch NF4 path (qlora_flow/nf4_linear.py): bitsandbytes' numbers bit for bit, less kept for backward."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_f
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

from qlora_flow.nf4_linear import NF4Matmul, apply_torch_nf4, dequantize_nf4

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _assert_bit_equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    # compare the bit patterns: torch.equal would let -0.0 == 0.0 through
    assert torch.equal(ours.view(_INT_VIEW[ours.dtype]), theirs.view(_INT_VIEW[theirs.dtype]))


def _bnb_dequantized(packed, quant_state, dtype):
    state = copy.copy(quant_state)
    state.dtype = dtype  # bitsandbytes dequantizes to quant_state.dtype
    return bnb_f.dequantize_4bit(packed, state)


@pytest.mark.parametrize("nested", [False, True], ids=["plain_absmax", "double_quant"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(64, 128), (96, 256)], ids=["64x128", "96x256"])
def test_dequantize_equals_bitsandbytes_bit_for_bit(shape, blocksize, nested):
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.05
    packed, state = bnb_f.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested, blocksize=blocksize)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        _assert_bit_equal(dequantize_nf4(packed, state, dtype), _bnb_dequantized(packed, state, dtype))
    assert dequantize_nf4(packed, state).dtype == torch.float32  # default: quant_state.dtype


def test_bf16_storage_is_bit_exact_too_and_other_4_bit_types_are_refused():
    torch.manual_seed(0)
    weight = (torch.randn(64, 128) * 0.05).to(torch.bfloat16)
    packed, state = bnb_f.quantize_4bit(
        weight, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16
    )
    assert packed.dtype == torch.bfloat16
    _assert_bit_equal(dequantize_nf4(packed, state), bnb_f.dequantize_4bit(packed, state))

    packed, state = bnb_f.quantize_4bit(weight.float(), quant_type="fp4", compress_statistics=True)
    with pytest.raises(ValueError, match="'fp4'"):
        dequantize_nf4(packed, state, torch.float32)


@pytest.mark.parametrize("shape", [(32, 96), (7, 10)])
def test_blocks_run_across_rows_like_the_quantizer(shape):
    """Blocks are runs of the flattened weight, as quantize_4bit (and the CUDA kernel) lays them out, also where
    a row is not a whole number of blocks; re-quantizing the dequantized weight gives back the same bytes.
    (bitsandbytes' own AVX512 CPU dequantization indexes blocks per row and is off for such shapes.)"""
    torch.manual_seed(0)
    packed, state = bnb_f.quantize_4bit(torch.randn(shape), quant_type="nf4", compress_statistics=True, blocksize=64)
    again, _ = bnb_f.quantize_4bit(dequantize_nf4(packed, state), quant_type="nf4", blocksize=64)
    assert torch.equal(again, packed)


def _linear4bit(
    bias: bool, compute_dtype: torch.dtype, quant_type: str = "nf4", weight_dtype: torch.dtype = torch.float32
) -> nn.Module:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(
        128, 64, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type, compress_statistics=True
    )
    weight = (torch.randn(64, 128) * 0.05).to(weight_dtype)  # quant_state.dtype
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, compress_statistics=True)
    if bias:
        layer.bias = nn.Parameter(torch.randn(64, dtype=compute_dtype) * 0.1)
    return layer.to("cpu").train()  # quantizes on the CPU


@pytest.fixture
def nf4_calls(monkeypatch):
    """Shapes of the weights that went through NF4Matmul (proves the torch path ran, not the fallback)."""
    calls = []
    apply = NF4Matmul.apply

    def counting_apply(*args):
        calls.append(args[8])
        return apply(*args)

    monkeypatch.setattr(NF4Matmul, "apply", counting_apply)
    return calls


def _forward_backward(layer: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.float().square().sum().backward()
    bias_grad = None if layer.bias is None else layer.bias.grad
    layer.zero_grad(set_to_none=True)
    return out.detach(), x.grad, bias_grad


@pytest.mark.parametrize(
    ("compute_dtype", "weight_dtype"),
    # fp32 compute over a bf16 weight: bitsandbytes' backward rounds the weight to bf16 first, and so does this
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "fp32_over_bf16_weight"],
)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_linear4bit_forward_and_input_grad_equal_bitsandbytes(bias, compute_dtype, weight_dtype, nf4_calls):
    layer = _linear4bit(bias, compute_dtype, weight_dtype=weight_dtype)
    # bitsandbytes' MatMul4Bit sums the bias gradient over dim 0 only, so it takes 2-d inputs where there is a bias
    x = torch.randn(10, 128) if bias else torch.randn(2, 5, 128)
    expected = _forward_backward(layer, x)
    original_forward = layer.forward

    assert apply_torch_nf4(layer) == 1
    assert apply_torch_nf4(layer) == 0  # not twice
    assert layer._bnb_forward == original_forward
    got = _forward_backward(layer, x)

    assert nf4_calls == [(64, 128)]
    for ours, theirs in zip(got, expected, strict=True):
        if theirs is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert got[0].dtype == x.dtype
    assert layer.weight.grad is None


def _saved_for_backward(fn, x):
    """(shape, dtype) of every tensor autograd keeps for backward while `fn(x)` runs forward."""
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = fn(x)
    value.backward()
    assert x.grad is not None
    return saved


def _dequantized_weights(saved):
    return [s for s in saved if s[1].is_floating_point and s[0] in ((64, 128), (128, 64), (64 * 128,))]


def test_backward_keeps_the_packed_weight_not_a_dequantized_one():
    layer = _linear4bit(bias=False, compute_dtype=torch.bfloat16)
    apply_torch_nf4(layer)
    saved = _saved_for_backward(lambda x: layer(x).float().sum(), torch.randn(4, 128))
    assert ((64 * 128 // 2, 1), torch.uint8) in saved
    assert not _dequantized_weights(saved)


def test_fp4_and_cpu_inference_stay_on_bitsandbytes(nf4_calls):
    fp4 = _linear4bit(bias=False, compute_dtype=torch.float32, quant_type="fp4")
    assert apply_torch_nf4(fp4) == 0
    assert not hasattr(fp4, "_bnb_forward")

    # eval without grad on CPU: bitsandbytes repacks the weight for its AVX512-BF16 kernel (where the CPU has
    # one), which the torch path must leave to it; the outputs then agree with an untouched twin layer
    x = torch.randn(3, 128)
    reference, patched = (_linear4bit(bias=False, compute_dtype=torch.float32).eval() for _ in range(2))
    apply_torch_nf4(patched)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(patched(x), reference(x), rtol=0, atol=0)
    if not patched.support_avx512bf16_for_cpu:
        assert len(nf4_calls) == 2


def _tiny_qlora_llama(model_dir):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.LlamaForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    # init_lora_weights=False: a random (not zero) lora_B, so every LoRA gradient is non-trivial
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=_TARGETS)
    return get_peft_model(model, lora).train()


def _loss_and_lora_grads(model, input_ids):
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_peft_llama_loss_and_lora_grads_equal_bitsandbytes(tmp_path, nf4_calls):
    model = _tiny_qlora_llama(tmp_path / "tiny")
    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected_loss, expected_grads = _loss_and_lora_grads(model, input_ids)

    assert apply_torch_nf4(model) == 14
    assert apply_torch_nf4(model) == 0
    loss, grads = _loss_and_lora_grads(model, input_ids)

    assert len(nf4_calls) == 14
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    assert grads.keys() == expected_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0)


def test_compiled_layer_is_torch_ops_only_matches_eager_and_keeps_the_packed_weight():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    layer = _linear4bit(bias=True, compute_dtype=torch.float32)
    apply_torch_nf4(layer)

    def loss(x):
        return layer(x).square().sum()

    x = torch.randn(6, 128)
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return make_boxed_func(graph_module.forward)

    torch._dynamo.reset()
    _forward_backward_fn(torch.compile(loss, backend=aot_autograd(fw_compiler=record, bw_compiler=record)), x)
    assert len(graphs) == 2  # one forward and one backward graph: no graph break
    targets = {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert "aten.__rshift__.Scalar" in targets  # the dequantization is in the graph, for inductor to fuse
    assert not [t for t in targets if "bitsandbytes" in t]

    compiled = torch.compile(loss, fullgraph=True)
    expected, got = _forward_backward_fn(loss, x), _forward_backward_fn(compiled, x)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # inductor's partitioner picks what the compiled forward keeps for backward; it must not be the weight
    saved = _saved_for_backward(compiled, x)
    assert ((64 * 128 // 2, 1), torch.uint8) in saved
    assert not _dequantized_weights(saved)
    torch._dynamo.reset()


def _forward_backward_fn(fn, x):
    x = x.clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


def test_checkpointed_compiled_layers_trace_without_graph_breaks(tmp_path, monkeypatch):
    """The stage's GPU recipe around it: gradient checkpointing and compiled decoder layers. Anything the torch
    path mutates while traced (a cache filled on first use) breaks the checkpointed layer's graph, and the layer
    then runs eagerly; the result must still equal the uncompiled model's."""
    from torch._dynamo.utils import counters

    from qlora_flow import nf4_linear
    from qlora_flow.speedups import compile_decoder_layers

    monkeypatch.setattr(nf4_linear, "_code_tables", {})  # as in a fresh process: earlier tests filled it
    model = _tiny_qlora_llama(tmp_path / "tiny")
    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected_loss, expected_grads = _loss_and_lora_grads(model, input_ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    assert apply_torch_nf4(model) == 14
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(model) == 2
    loss, grads = _loss_and_lora_grads(model, input_ids)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one graph, shared by both layers
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
