"""Optional speed levers for GPU training, kept only where `bench/train_gpu.py` shows they pay."""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks of a (possibly PEFT-wrapped) causal LM."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"no ModuleList of {count} decoder layers found in {type(model).__name__}")


def compile_decoder_layers(model: nn.Module) -> int:
    """torch.compile each decoder layer in place (one graph, reused by every layer); returns how many.

    Per layer rather than the whole model: the embedding, loss and trainer code stay eager. Shapes are
    left to automatic dynamic: packed micro-batches change length from step to step, and a static
    compile (dynamic=False) recompiled on every new length (seen on the GPU); this way each layer
    compiles once for the first length and once more, shape-generic, at the first change. CUDA graphs
    (`mode="reduce-overhead"`) were 5.9x slower on an H200 (run 24: re-recorded as lengths changed).

    Under gradient checkpointing dynamo traces each layer inside the checkpoint operator, which refuses any
    forward side effect. transformers 5.25 (through `kernels`, a dependency it installs) sets and resets a
    module-level context variable around every attention forward, and the refusal left each checkpointed
    layer with no compiled graph at all (tests/test_speedups.py). The pair restores the variable, so not
    replaying it in the recomputation changes nothing: dynamo's own switch for this case, set process-wide
    (the training child is one process per run). Older torch, without the switch, predates that code.
    """
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


class _CpuEmbedding(nn.Module):
    """An input embedding looked up in CPU memory; only the looked-up rows travel to the GPU.

    With `pinned`, the table and the rows' staging buffer live in page-locked memory, so the copy to the
    GPU is asynchronous: a copy from pageable memory blocks the Python thread while the GPU drains.
    """

    def __init__(self, table: nn.Embedding, device: torch.device, pinned: bool):
        super().__init__()
        # Frozen here: PEFT freezes the base model through its parameters, and this table is hidden from them.
        # Left trainable, every backward would build a dense 1 GiB gradient for it on the CPU (measured: -25%).
        table = table.to("cpu").requires_grad_(False)
        if pinned:
            table.weight.data = table.weight.data.pin_memory()
        # Held in a list, out of module traversal, so that model.to(device) by the Trainer leaves it on the CPU.
        self._tables, self.device, self.pinned = [table], device, pinned
        self._staging: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self._tables[0].weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # From the GPU, .to("cpu") waits for it, so the previous call's copy out of the staging buffer is done.
        ids = input_ids.to("cpu")
        if not self.pinned or input_ids.device.type == "cpu":
            return self._tables[0](ids).to(self.device, non_blocking=True)
        return self._staged_rows(ids).to(self.device, non_blocking=True)

    def _staged_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows for `ids`, gathered into the page-locked buffer that every call reuses."""
        weight = self._tables[0].weight
        size = ids.numel() * weight.shape[1]
        if self._staging is None or self._staging.numel() < size:
            self._staging = torch.empty(size, dtype=weight.dtype).pin_memory()
        rows = self._staging[:size].view(-1, weight.shape[1])
        torch.index_select(weight, 0, ids.reshape(-1), out=rows)
        return rows.view(*ids.shape, weight.shape[1])


def input_embedding_on_cpu(model: nn.Module, pinned: bool = True) -> bool:
    """Move the frozen input embedding (1 GiB for Llama-3-8B in bf16) to CPU memory; returns whether it moved.

    A tied embedding is also the LM head, which must stay with the compute, so it stays. The table moves
    after loading because a 4-bit checkpoint cannot be loaded with a CPU entry in its device map. Its
    weights leave the model's state dict, which is fine for LoRA: only adapter weights are saved.
    """
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if output is not None and output.weight is embedding.weight:
        return False
    model.set_input_embeddings(_CpuEmbedding(embedding, embedding.weight.device, pinned and torch.cuda.is_available()))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


# Saved tensors smaller than this stay on the GPU under activation offloading: the copies that pay are the
# checkpointed layer inputs (tokens x hidden x 2 bytes, 32 MiB for 4,096 tokens of Llama-3-8B); TRL's default of
# 1 KiB also sends position ids, rotary tables and masks back and forth, each with its own Python bookkeeping.
OFFLOAD_MIN_BYTES = 4 * 2**20


def offload_large_activations_only(trainer, min_bytes: int = OFFLOAD_MIN_BYTES) -> None:
    """Replace the activation-offloading context of a TRL trainer built with `activation_offloading=True`."""
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    if not hasattr(trainer, "maybe_activation_offload_context"):
        raise RuntimeError(
            f"{type(trainer).__name__} has no `maybe_activation_offload_context`: this TRL version offloads differently; "
            "pin trl to a version with it, or set training.offload: off"
        )
    trainer.maybe_activation_offload_context = get_act_offloading_ctx_manager(trainer.model, min_offload_size=min_bytes)
