"""Choose the training profile (packing, checkpointing, micro-batch, attention) from the hardware found.

The same function drives the training stage and `bench/train_gpu.py`, so the benchmark measures the
defaults users get. Memory estimates use per-token activation coefficients measured on an H200 with
the Llama-3-8B shape (see README, performance section); they only need to be right to within the
safety margin, because a wrong guess costs speed (checkpointing on), never an out-of-memory crash
when the budget is enforced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Bytes of activations kept per token per layer per hidden unit in bf16, measured on an H200 with the
# Llama-3-8B shape: 69.5 GiB peak at 8,192 tokens per micro-batch without checkpointing; with it only
# each layer's input survives (plus one layer being recomputed).
_ACT_BYTES_NO_CHECKPOINTING = 64.0
_ACT_BYTES_CHECKPOINTING = 2.5
# torch.compile of each decoder layer fuses the elementwise ops and keeps fewer intermediates:
# 58.1 GiB instead of 68.8 at 8,192 tokens (same GPU and shape).
_ACT_BYTES_NO_CHECKPOINTING_COMPILED = 53.0
# Activations are the uncertain, fragmenting part of the peak (W2 on the whole H200: 110 GiB allocated,
# 133 GiB reserved): the budget keeps 15% of them spare. Weights and fixed costs are known to ~0.2 GiB.
_SAFETY = 0.85
# Step-time model: time(micro-batch) ~ tokens * (1.41 if checkpointing) + a fixed cost per micro-batch (NF4
# dequantization, LoRA and bitsandbytes launches). Fitted to W1 on an H200 with compiled layers (runs 13, 17, 18):
# 16 x 1,024 unchecked 14,363 tok/s, 4 x 1,024 unchecked 12,909, 16 x 1,024 checkpointed 10,245 give a fixed cost
# of ~640 tokens and a slowdown of 1.42. So at 40 GiB 4 unchecked rows beat 16 checkpointed ones (1.26x measured);
# the ~5,100 fitted before compile (runs 1-2) made the planner checkpoint there.
_CHECKPOINTING_SLOWDOWN = 1.41
_FIXED_COST_TOKENS = 640.0
# Offload (input embedding and checkpointed layer inputs in CPU memory) is only planned with checkpointing.
# Measured on an H200 at micro-batch 4 (8B): activation offload alone cost 2% (run 11), and the whole offload
# profile ran at 1.31-1.33x the baseline in 6.2 GiB (run 12), where the same micro-batch without offload does
# not fit 7 GiB. Under `auto` it is tried only when nothing fits without it (pinned host memory and PCIe
# bandwidth are shared with the host's other GPUs); this cost then only ranks the offloaded profiles.
_OFFLOAD_SLOWDOWN = 1.1


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    tied_embeddings: bool = False  # a tied input embedding is also the LM head and must stay on the GPU


@dataclass(frozen=True)
class TrainingPlan:
    packing: bool
    gradient_checkpointing: bool
    compile_layers: bool
    offload: bool
    per_device_batch_size: int
    gradient_accumulation_steps: int
    attn_implementation: str | None
    estimated_peak_gib: float
    reason: str
    # LoRA updates through qlora_flow/fused_lora.py: its dropout mask is pointwise hashing, free only inside
    # compiled layers, so it goes with them (on the GPU).
    fused_lora: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _weights_gib(shape: ModelShape, quantized: bool) -> float:
    # NF4 with double quantization: ~0.53 bytes/param for linear layers; embeddings and head stay 16-bit.
    embed = 2 * shape.vocab_size * shape.hidden_size * 2
    linear = shape.parameters - 2 * shape.vocab_size * shape.hidden_size
    return ((0.53 if quantized else 2.0) * linear + embed) / 2**30


def estimate_peak_gib(
    shape: ModelShape,
    tokens_per_micro_batch: int,
    checkpointing: bool,
    quantized: bool,
    compiled: bool = False,
    offload: bool = False,
    margin: bool = False,
) -> float:
    """Peak GPU memory of a training step; with `margin`, what the planner reserves for it."""
    full = _ACT_BYTES_NO_CHECKPOINTING_COMPILED if compiled else _ACT_BYTES_NO_CHECKPOINTING
    # Checkpointing keeps each layer's input; offload moves those to CPU memory.
    per_token = (0.0 if offload else _ACT_BYTES_CHECKPOINTING) if checkpointing else full
    activations = per_token * shape.num_layers * shape.hidden_size * tokens_per_micro_batch
    if checkpointing:  # one layer is recomputed with full activations during backward
        activations += full * shape.hidden_size * tokens_per_micro_batch
    weights = _weights_gib(shape, quantized)
    if offload and not shape.tied_embeddings:
        weights -= shape.vocab_size * shape.hidden_size * 2 / 2**30
    activations_gib = activations / 2**30 / (_SAFETY if margin else 1.0)
    return weights + activations_gib + 1.0  # + CUDA context, LoRA state, workspace


def resolve_packing(packing: str, device: str) -> bool:
    """auto packs on CUDA GPUs only: on a CPU, packing's attention masks cost more than the padding saves."""
    return packing == "on" or (packing == "auto" and device == "cuda")


def plan_training(
    *,
    device: str,
    shape: ModelShape,
    max_seq_length: int,
    batch_size: int,
    grad_accum: int,
    checkpointing: str = "auto",
    packing: str = "auto",
    memory_budget_gib: float | None = None,
    quantized: bool = True,
    world_size: int = 1,
    compile_layers: str = "auto",
    offload: str = "auto",
) -> TrainingPlan:
    """Pick the fastest profile that fits: no checkpointing and bigger micro-batches when memory allows.

    batch_size x grad_accum is the global batch (examples per optimizer step) whatever the GPU count, so
    adding GPUs under DDP speeds a run up without changing what it learns; each GPU takes 1/world_size.
    """
    global_batch = batch_size * grad_accum
    if global_batch % world_size:
        raise ValueError(
            f"training.per_device_batch_size x gradient_accumulation_steps = {global_batch} examples per step "
            f"cannot be split evenly over {world_size} GPUs; make it a multiple of {world_size}"
        )
    rank_batch = global_batch // world_size
    if device != "cuda":
        # CPUs have the memory; recomputation and packing kernels only cost time there.
        micro = max(d for d in range(1, min(batch_size, rank_batch) + 1) if rank_batch % d == 0)
        return TrainingPlan(
            packing=resolve_packing(packing, device),
            gradient_checkpointing=checkpointing == "on",
            compile_layers=compile_layers == "on",
            offload=False,
            per_device_batch_size=micro,
            gradient_accumulation_steps=rank_batch // micro,
            attn_implementation="sdpa",
            estimated_peak_gib=0.0,
            reason="cpu: configured batch, no checkpointing",
        )
    use_packing = resolve_packing(packing, device)
    compiled = compile_layers != "off"
    attn = "flex_attention" if use_packing else "sdpa"
    budget = memory_budget_gib or 80.0
    modes = {"on": [True], "off": [False]}.get(checkpointing, [False, True])

    def fastest_fitting(off: bool) -> TrainingPlan | None:
        """Every micro-batch that divides the global batch, with and without checkpointing: the fastest by
        the step-time model among those whose peak, with the margin, fits the budget."""
        best: tuple[float, TrainingPlan] | None = None
        for micro in (d for d in range(1, rank_batch + 1) if rank_batch % d == 0):
            tokens = micro * max_seq_length
            for ckpt in modes:
                if off and not ckpt:  # offload moves checkpointed activations: nothing to move without them
                    continue
                planned = estimate_peak_gib(shape, tokens, ckpt, quantized, compiled, off, margin=True)
                if planned > budget:
                    continue
                cost = tokens * (_CHECKPOINTING_SLOWDOWN if ckpt else 1.0) * (_OFFLOAD_SLOWDOWN if off else 1.0)
                speed = tokens / (cost + _FIXED_COST_TOKENS)
                if best is None or speed > best[0]:
                    peak = estimate_peak_gib(shape, tokens, ckpt, quantized, compiled, off)
                    reason = (
                        f"micro-batch {micro}, checkpointing {'on' if ckpt else 'off'}"
                        f"{', offload to CPU' if off else ''}: ~{peak:.1f} GiB (+ margin {planned - peak:.1f}) "
                        f"of {budget:.0f}"
                    )
                    plan = TrainingPlan(
                        use_packing,
                        ckpt,
                        compiled,
                        off,
                        micro,
                        rank_batch // micro,
                        attn,
                        round(peak, 1),
                        reason,
                        fused_lora=compiled,
                    )
                    best = (speed, plan)
        return None if best is None else best[1]

    # auto: offload only when nothing fits without it. Its measured profiles are the 7 GiB one (micro-batch 4,
    # 1.31-1.33x the baseline); bigger offloaded micro-batches at mid-size budgets are modelled, never measured.
    for off in {"on": [True], "off": [False]}.get(offload, [False, True]):
        plan = fastest_fitting(off)
        if plan is not None:
            return plan
    ckpt = checkpointing != "off"
    smallest = ckpt and offload != "off"
    return TrainingPlan(
        use_packing,
        ckpt,
        compiled,
        smallest,
        1,
        rank_batch,
        attn,
        round(estimate_peak_gib(shape, max_seq_length, ckpt, quantized, compiled, smallest), 1),
        "smallest profile; may exceed the budget",
        fused_lora=compiled,
    )
