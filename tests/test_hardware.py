"""The training stage's GPU memory cap: the configured budget as a fraction of the GPU, never above all of it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qlora_flow.hardware import cap_gpu_memory, resolve_compute_dtype


def test_float16_on_a_cpu_is_refused_also_when_the_device_was_auto():
    with pytest.raises(ValueError, match="float16 compute is not supported on the CPU"):
        resolve_compute_dtype("float16", "cpu")
    assert resolve_compute_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize(("budget_gib", "expected"), [(7.0, 0.05), (40.0, 40 / 140), (500.0, 1.0)])
def test_budget_becomes_the_allocator_fraction_of_this_gpu(monkeypatch, budget_gib, expected):
    fractions = []  # CI has no GPU: the CUDA calls are replaced by a 140 GiB device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=140 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction: fractions.append(fraction))
    assert cap_gpu_memory(budget_gib) == pytest.approx(expected)
    assert fractions == [pytest.approx(expected)]
