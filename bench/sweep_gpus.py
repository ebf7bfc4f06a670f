"""Wall time of one training vs two side by side on two GPUs (GpuTaskRunner), printed as JSON.

    python bench/sweep_gpus.py [--config configs/demo.yaml] [--steps 40]

Each measurement uses a fresh artifact store (so nothing is reused from cache) after a warm-up
that prepares the base model once. Ideal scaling: `two_parallel_s` close to `one_s`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from prefect.settings import PREFECT_LOGGING_LEVEL, temporary_settings

from flows.sweep import lora_sweep
from qlora_flow.config import load_config
from qlora_flow.gpu_runner import host_gpu_count


def timed_sweep(config_path: str, steps: int, ranks: list[int], store: Path) -> tuple[float, list[dict]]:
    cfg = load_config(config_path, {
        "training.max_steps": steps, "execution.store": str(store), "execution.local_cache": str(store / "_cache"),
        "execution.gpus": 1, "evaluation.max_generation_samples": 8,
    })  # fmt: skip
    started = time.perf_counter()
    points = lora_sweep(cfg, ranks)
    return time.perf_counter() - started, [p.model_dump(include={"rank", "cuda_visible_devices", "train_seconds"}) for p in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    gpus = host_gpu_count(load_config(args.config).execution)
    if gpus < 2:
        raise SystemExit(f"needs 2 GPUs, found {gpus}")
    with tempfile.TemporaryDirectory() as tmp, temporary_settings({PREFECT_LOGGING_LEVEL: "WARNING"}):
        timed_sweep(args.config, 2, [2], Path(tmp) / "warmup")  # imports, kernels, base conversion
        one_s, one = timed_sweep(args.config, args.steps, [8], Path(tmp) / "one")
        two_s, two = timed_sweep(args.config, args.steps, [8, 16], Path(tmp) / "two")
    print(json.dumps({
        "gpus": gpus, "steps": args.steps, "one_s": round(one_s, 1), "two_parallel_s": round(two_s, 1),
        "parallel_efficiency": round(one_s / two_s, 3), "one": one, "two": two,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
