"""The frozen NF4 base projection in plain torch ops, so that torch.compile can see into it and fuse it.

A GPU profile of QLoRA training (Llama-3-8B shape, compiled decoder layers, gradient checkpointing) had the GPU
idle about 20% of each step, and bitsandbytes' `bitsandbytes::gemm_4bit` op cost about 250 us of CPU (Python
dispatch) per call, 900 calls per step. Inside a compiled layer that op is opaque: inductor cannot fuse the
dequantization into anything and every call pays the dispatch. Here the dequantization is a table look-up, two
nibble shifts and a per-block multiply, which inductor compiles into the layer's own kernels.

`dequantize_nf4` equals `bitsandbytes.functional.dequantize_4bit` bit for bit (bf16, fp16 and fp32 output,
plain or double-quantized absmax): like bitsandbytes' CUDA and CPU kernels it multiplies the fp32 code by the
fp32 block absmax and rounds once to the output dtype. Blocks are runs of the flattened weight, as the quantizer
and the CUDA kernel lay them out (bitsandbytes' AVX512 CPU kernel indexes them per row instead, which is wrong
where in_features is not a multiple of the block size). `NF4Matmul` is `x @ W.T (+ bias)` keeping only the
packed weight and its quantization state for backward, eager and compiled, and dequantizing again there; the
weight is frozen (no weight gradient). `apply_torch_nf4` points each NF4 `bitsandbytes.nn.Linear4bit` (PEFT base
layers included) at it and leaves whatever it does not handle on bitsandbytes' forward.

Compiled on the CPU it stayed bit-exact; on a GPU inductor's kernels may round differently (e.g. by contracting
the nested absmax's `code * absmax2 + offset` into a fused multiply-add), which has not been checked there.
"""

from __future__ import annotations

import types
from math import prod

import torch
from torch import nn

# The float32 values bitsandbytes' CUDA and CPU kernels hard-code (and `get_4bit_type` returns). Like those kernels,
# this ignores `quant_state.code` for the 4-bit weight (a map stored in a checkpoint does not change the result).
_NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
_code_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_table(quant_type: str, device: torch.device | str) -> torch.Tensor:
    """The 16 float32 values a 4-bit index stands for, cached per device (built once, not per call)."""
    if quant_type != "nf4":
        raise ValueError(f"unsupported 4-bit quant_type {quant_type!r}: only 'nf4'")
    device = torch.device(device)
    key = (quant_type, device)
    if key not in _code_tables:
        _code_tables[key] = torch.tensor(_NF4_CODE, dtype=torch.float32).to(device)
    return _code_tables[key]


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (flat, fp32) times the scale of their block of `blocksize`; the last block may be partial."""
    n = values.numel()
    rem = n % blocksize
    if rem:
        values = nn.functional.pad(values, (0, blocksize - rem))
    return (values.view(-1, blocksize) * scales.view(-1, 1)).view(-1)[:n]


def _dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    table: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int,
    dtype: torch.dtype,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    blocksize2: int = 0,
    offset: torch.Tensor | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    # `recompute` (backward) spells the same arithmetic with other ops: see NF4Matmul.backward
    if absmax2 is not None:
        # bitsandbytes: dequantize_blockwise(absmax, state2) (fp32 code * fp32 block scale), then += offset
        qabsmax = absmax.reshape(-1)
        qabsmax = qabsmax.int() if recompute else qabsmax.long()
        absmax = _scale_blocks(code2[qabsmax], absmax2, blocksize2) + offset
    absmax = absmax.float()
    if packed.dtype != torch.uint8:  # quant_storage other than uint8 (e.g. bf16 for FSDP) holds the same bytes
        packed = packed.view(torch.uint8)
    packed = packed.reshape(-1)
    n = prod(shape)
    # high nibble is the first of the two values in each byte
    high, low = (packed // 16, packed % 16) if recompute else (packed >> 4, packed & 0x0F)
    # int32 indices: half the eager temporary of int64 (a uint8 index would be read as a mask)
    idx = torch.stack((high, low), dim=-1).reshape(-1)[:n].int()
    values = _scale_blocks(table[idx], absmax, blocksize)
    return values.view(shape).to(dtype)


def dequantize_nf4(weight: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`bitsandbytes.functional.dequantize_4bit(weight, quant_state)` in torch ops, to `dtype`
    (default `quant_state.dtype`); shaped `quant_state.shape`. Other 4-bit types raise ValueError."""
    dtype = quant_state.dtype if dtype is None else dtype
    table = code_table(quant_state.quant_type, weight.device)
    shape = tuple(int(s) for s in quant_state.shape)
    if not quant_state.nested:
        return _dequantize(weight, quant_state.absmax, table, shape, quant_state.blocksize, dtype)
    state2 = quant_state.state2
    if state2.dtype not in (None, torch.float32):
        # bitsandbytes rounds the nested absmax to state2.dtype before adding the offset; always fp32 in practice
        raise ValueError(f"nested absmax dtype {state2.dtype} is not supported (only float32)")
    return _dequantize(
        weight,
        quant_state.absmax,
        table,
        shape,
        quant_state.blocksize,
        dtype,
        state2.absmax,
        state2.code.to(weight.device),
        state2.blocksize,
        quant_state.offset,
    )


class NF4Matmul(torch.autograd.Function):
    """`x @ W.T + bias` for a frozen 4-bit W given as its packed bytes and quantization state.

    Saves only the packed weight and state tensors (references, no copies) and dequantizes again in backward,
    as bitsandbytes' MatMul4Bit does: keeping the dequantized weight would cost 2 bytes (bf16) per frozen
    parameter until backward. W is dequantized to x's dtype in forward; in backward to `weight_dtype` and then to the
    gradient's dtype, bitsandbytes' order (identical when the two dtypes agree, as in bf16 training).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        table: torch.Tensor,
        bias: torch.Tensor | None,
        absmax2: torch.Tensor | None,
        code2: torch.Tensor | None,
        offset: torch.Tensor | None,
        shape: tuple[int, int],
        blocksize: int,
        blocksize2: int,
        weight_dtype: torch.dtype,
    ) -> torch.Tensor:
        weight = _dequantize(packed, absmax, table, shape, blocksize, x.dtype, absmax2, code2, blocksize2, offset)
        ctx.save_for_backward(packed, absmax, table, absmax2, code2, offset)
        ctx.meta = (shape, blocksize, blocksize2, weight_dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # Under torch.compile the joint forward+backward graph is CSE'd before AOT's partitioner decides what to
        # save. Spelled with the forward's ops, this dequantization merged with the forward's, and the partitioner
        # then saved the dequantized weight (it bans recomputing a tensor the backward matmul must materialize).
        # With other (bit-identical) ops it stays a backward-only chain from the packed weight, which is saved.
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            packed, absmax, table, absmax2, code2, offset = ctx.saved_tensors
            shape, blocksize, blocksize2, weight_dtype = ctx.meta
            weight = _dequantize(
                packed, absmax, table, shape, blocksize, weight_dtype, absmax2, code2, blocksize2, offset, True
            )
            grad_x = torch.matmul(grad_out, weight.to(grad_out.dtype))
        if ctx.needs_input_grad[4]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=ctx.bias_dtype)
        return grad_x, None, None, None, grad_bias, None, None, None, None, None, None, None


def torch_path_covers(module, x: torch.Tensor) -> bool:
    """Whether the torch forward covers this call; otherwise bitsandbytes' own forward runs."""
    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None or qs.quant_type != "nf4" or getattr(qs, "packing_format_for_cpu", False):
        return False
    if qs.shape is None or len(qs.shape) != 2 or x.shape[-1] != qs.shape[1] or x.numel() == 0:
        return False  # the [K, N] (transposed) legacy layout and empty inputs take bitsandbytes' special cases
    packed = weight.data
    if type(packed) is not torch.Tensor or packed.device != x.device or not packed.is_contiguous():
        return False  # e.g. FSDP's DTensor shards
    if qs.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    state_tensors = [qs.absmax]
    if qs.nested:
        if qs.state2.blocksize != 256 or qs.state2.dtype not in (None, torch.float32):
            return False  # bitsandbytes' matmul refuses other nested block sizes
        state_tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
    if any(t.device != x.device for t in state_tensors):
        return False
    # bitsandbytes repacks the weight for its AVX512-BF16 CPU inference kernel on this path; leave it to it
    cpu_inference = x.device.type == "cpu" and not module.training and not x.requires_grad
    return not (cpu_inference and getattr(module, "support_avx512bf16_for_cpu", False))


def _torch_nf4_forward(self, x: torch.Tensor) -> torch.Tensor:
    """`Linear4bit.forward` with the 4-bit matmul as `NF4Matmul`."""
    if not torch_path_covers(self, x):
        return self._bnb_forward(x)
    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    inp_dtype = x.dtype
    compute_x = x if self.compute_dtype is None else x.to(self.compute_dtype)
    bias = self.bias
    if bias is not None:
        if bias.dtype != compute_x.dtype or self.compute_dtype is None:
            # bitsandbytes recasts the bias parameter in place (once); let it
            return self._bnb_forward(x)
        bias = bias.to(self.compute_dtype)
    qs = self.weight.quant_state
    table = code_table("nf4", x.device)
    shape = (int(qs.shape[0]), int(qs.shape[1]))
    if qs.nested:
        nested = (qs.state2.absmax, qs.state2.code, qs.offset, qs.state2.blocksize)
    else:
        nested = (None, None, None, 0)
    absmax2, code2, offset, blocksize2 = nested
    out = NF4Matmul.apply(
        compute_x,
        self.weight.data,
        qs.absmax,
        table,
        bias,
        absmax2,
        code2,
        offset,
        shape,
        qs.blocksize,
        blocksize2,
        qs.dtype,
    )
    return out.to(inp_dtype)


def apply_torch_nf4(model: nn.Module) -> int:
    """Route every `bitsandbytes.nn.Linear4bit` in `model` (PEFT base layers included) through `NF4Matmul`.

    The original bound forward stays as `module._bnb_forward` and handles any call the torch path does not
    (no quant_state yet, fp4, the CPU inference repacking, ...). Idempotent; returns how many were replaced now.
    """
    from bitsandbytes.nn import Linear4bit

    replaced = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit) or hasattr(module, "_bnb_forward"):
            continue
        if getattr(module.weight, "quant_type", None) != "nf4":
            continue
        # Built now: filling the cache inside a checkpointed compiled layer is a side effect that breaks its graph.
        code_table("nf4", module.weight.device)
        module._bnb_forward = module.forward
        module.forward = types.MethodType(_torch_nf4_forward, module)
        replaced += 1
    return replaced
