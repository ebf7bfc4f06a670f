"""Wall time of one training vs two side by side on two GPUs (GpuTaskRunner), printed as JSON.

    python bench/sweep_gpus.py [--config configs/demo.yaml] [--shape llama3.2-1b] [--steps 200]

With --shape, the base model is a random-weight model of that architecture (bench/train_gpu.py's
SHAPES) with the test tokenizer, so the run needs no download; without it, the config's base model.
Each measurement uses a fresh artifact store (nothing reused from cache) after a warm-up that pays
imports and kernel compilation once. Ideal scaling: `two_parallel_s` close to `one_s`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect.settings import PREFECT_LOGGING_LEVEL, temporary_settings

from flows.sweep import lora_sweep
from qlora_flow.config import load_config
from qlora_flow.gpu_runner import host_gpu_count

TOKENIZER = Path(__file__).resolve().parent.parent / "tests/fixtures/tokenizer"


def random_model_dir(shape: str, root: Path) -> Path:
    """A bf16 checkpoint of the named shape with random weights, plus the test tokenizer."""
    from transformers import AutoTokenizer

    from bench.train_gpu import random_model

    out = root / f"random-{shape}"
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    random_model(shape, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def timed_sweep(config_path: str, overrides: dict, ranks: list[int], store: Path) -> tuple[float, list[dict]]:
    cfg = load_config(
        config_path, {**overrides, "execution.store": str(store), "execution.local_cache": str(store / "_cache")}
    )
    started = time.perf_counter()
    points = lora_sweep(cfg, ranks)
    fields = {"rank", "cuda_visible_devices", "train_seconds", "started", "finished"}
    return time.perf_counter() - started, [p.model_dump(include=fields) for p in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--shape", default=None, help="random-weight base of this shape instead of the config's model")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    gpus = host_gpu_count(load_config(args.config).execution)
    if gpus < 2:
        raise SystemExit(f"needs 2 GPUs, found {gpus}")
    with tempfile.TemporaryDirectory() as tmp, temporary_settings({PREFECT_LOGGING_LEVEL: "WARNING"}):
        overrides = {"training.max_steps": args.steps, "execution.gpus": 1, "evaluation.max_generation_samples": 8}
        if args.shape:
            overrides["base_model.id"] = str(random_model_dir(args.shape, Path(tmp)))
        warmup = {**overrides, "training.max_steps": 2}
        timed_sweep(args.config, warmup, [2], Path(tmp) / "warmup")  # imports, kernels, page cache
        one_s, one = timed_sweep(args.config, overrides, [8], Path(tmp) / "one")
        # A partial result, in case the two-GPU half is cut off by the measurement window.
        print(
            json.dumps({"gpus": gpus, "shape": args.shape, "steps": args.steps, "one_s": round(one_s, 1), "one": one}),
            flush=True,
        )
        two_s, two = timed_sweep(args.config, overrides, [8, 16], Path(tmp) / "two")
    print(
        json.dumps(
            {
                "gpus": gpus,
                "shape": args.shape,
                "steps": args.steps,
                "one_s": round(one_s, 1),
                "two_parallel_s": round(two_s, 1),
                "parallel_efficiency": round(one_s / two_s, 3),
                "one": one,
                "two": two,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
