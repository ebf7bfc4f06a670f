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
    compiles once for the first length and once more, shape-generic, at the first change.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


class _CpuEmbedding(nn.Module):
    """An input embedding looked up in CPU memory; only the looked-up rows travel to the GPU."""

    def __init__(self, table: nn.Embedding, device: torch.device):
        super().__init__()
        # Held in a list, out of module traversal, so that model.to(device) by the Trainer leaves it on the CPU.
        self._tables, self.device = [table.to("cpu")], device

    @property
    def weight(self) -> torch.Tensor:
        return self._tables[0].weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._tables[0](input_ids.to("cpu")).to(self.device, non_blocking=True)


def input_embedding_on_cpu(model: nn.Module) -> bool:
    """Move the frozen input embedding (1 GiB for Llama-3-8B in bf16) to CPU memory; returns whether it moved.

    A tied embedding is also the LM head, which must stay with the compute, so it stays. The table moves
    after loading because a 4-bit checkpoint cannot be loaded with a CPU entry in its device map. Its
    weights leave the model's state dict, which is fine for LoRA: only adapter weights are saved.
    """
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if output is not None and output.weight is embedding.weight:
        return False
    model.set_input_embeddings(_CpuEmbedding(embedding, embedding.weight.device))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True
