"""Choose device and compute dtype from the hardware that is actually there.

torch is imported inside the functions: config validation asks `float16_on_cpu_problem` before torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ComputePlan:
    device: str
    compute_dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.compute_dtype).removeprefix("torch.")


def float16_on_cpu_problem(compute_dtype: str, device: str) -> str | None:
    """The one check that float16 compute is refused on the CPU (the Trainer's fp16 mixed precision needs a GPU):
    config validation asks it for `execution.device: cpu`, resolve_compute_dtype for what `auto` resolved to."""
    if compute_dtype == "float16" and device == "cpu":
        return "quantization.compute_dtype: float16 compute is not supported on the CPU; use float32 or auto"
    return None


def resolve_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("execution.device is 'cuda' but no CUDA GPU is visible; set it to 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolve_compute_dtype(requested: str, device: str) -> torch.dtype:
    """bf16 where the GPU supports it; fp32 on CPUs, where bf16 matmuls are ~15x slower without AVX-512."""
    import torch

    problem = float16_on_cpu_problem(requested, device)
    if problem:
        raise ValueError(problem)
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def compute_plan(device: str = "auto", compute_dtype: str = "auto") -> ComputePlan:
    resolved = resolve_device(device)
    return ComputePlan(resolved, resolve_compute_dtype(compute_dtype, resolved))


def cap_gpu_memory(budget_gib: float) -> float:
    """Hold this process's CUDA allocator to `budget_gib` on the current GPU; returns the fraction set.

    A configured budget is a promise to whoever shares the GPU, so it is enforced, not only planned for:
    past it the allocator frees its cache and retries, then fails with an out-of-memory error that names the cap.
    """
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fraction = min(1.0, budget_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction
