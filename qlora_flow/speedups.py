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

    Per layer rather than the whole model: the blocks are identical, so compilation is paid once, and
    the embedding, loss and trainer code stay eager. Compilation itself happens on the first step.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)
