"""Device and compute dtype: float16 refused on the CPU (one check for an explicit and an `auto` device), and the
training stage's GPU memory cap: the configured budget as a fraction of the GPU, never above all of it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qlora_flow.config import ConfigError, load_config
from qlora_flow.hardware import ComputePlan, cap_gpu_memory, compute_plan, float16_on_cpu_problem, resolve_compute_dtype


def test_float16_on_a_cpu_is_refused_also_when_the_device_was_auto():
    with pytest.raises(ValueError, match="float16 compute is not supported on the CPU"):
        resolve_compute_dtype("float16", "cpu")
    assert resolve_compute_dtype("auto", "cpu") == torch.float32


def test_float16_on_the_cpu_is_refused_with_one_message_whether_the_cpu_was_configured_or_found(monkeypatch):
    message = float16_on_cpu_problem("float16", "cpu")
    assert message == "quantization.compute_dtype: float16 compute is not supported on the CPU; use float32 or auto"
    # execution.device: cpu -> refused when the config is validated, before any hardware is looked at
    with pytest.raises(ConfigError) as info:
        load_config(None, {"quantization.compute_dtype": "float16", "execution.device": "cpu"})
    assert str(info.value) == f"invalid configuration in defaults: {message}"
    # execution.device: auto -> valid config; refused once auto resolves to the CPU, allowed on a GPU
    cfg = load_config(None, {"quantization.compute_dtype": "float16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as found:
        compute_plan(cfg.execution.device, cfg.quantization.compute_dtype)
    assert str(found.value) == message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_plan("auto", "float16") == ComputePlan("cuda", torch.float16)
    assert float16_on_cpu_problem("float16", "cuda") is None and float16_on_cpu_problem("float32", "cpu") is None


@pytest.mark.parametrize(("budget_gib", "expected"), [(7.0, 0.05), (40.0, 40 / 140), (500.0, 1.0)])
def test_budget_becomes_the_allocator_fraction_of_this_gpu(monkeypatch, budget_gib, expected):
    fractions = []  # CI has no GPU: the CUDA calls are replaced by a 140 GiB device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=140 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction: fractions.append(fraction))
    assert cap_gpu_memory(budget_gib) == pytest.approx(expected)
    assert fractions == [pytest.approx(expected)]
