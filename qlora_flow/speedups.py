"""Optional speed levers for GPU training, kept only where `bench/train_gpu.py` shows they pay."""

from __future__ import annotations

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
