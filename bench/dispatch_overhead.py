"""Per-step CPU overhead of the NF4 projections: bitsandbytes' op against qlora_flow/nf4_linear.py, compiled layers.

Run 25's profile (W1 at 16 GiB on an H200) had the GPU idle 19% of a step while bitsandbytes' `gemm_4bit` took
~255 us of Python per call. This measures that overhead without a GPU: a Llama with Llama-3-8B's 32 layers and
seven adapted projections each, but a hidden size of 64, so the arithmetic is negligible and a training step's
wall time is dispatch (Python, op dispatch, kernel launches or, on a CPU, inductor's C++ kernels' calls). Both
variants run the stage's GPU recipe otherwise: NF4 with double quantization, LoRA r=16 with dropout through
qlora_flow/fused_lora.py, compiled decoder layers, with and without gradient checkpointing.

    python bench/dispatch_overhead.py [--device cpu|cuda] [--layers 32] [--steps 10]

One JSON line per variant (median step ms, and `vs_bnb`: bitsandbytes' median over this one's, same checkpointing,
same invocation), naming the host. An upper bound for the GPU: there the kernels' own time hides part of it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _host(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _model(model_dir: Path, device: str, torch_nf4: bool, checkpointing: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_flow.fused_lora import apply_fused_lora
    from qlora_flow.nf4_linear import apply_torch_nf4
    from qlora_flow.speedups import compile_decoder_layers

    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 arithmetic is emulated on most CPUs
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, dtype=dtype, device_map={"": device}
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    apply_fused_lora(model)
    replaced = apply_torch_nf4(model) if torch_nf4 else 0
    compile_decoder_layers(model)
    return model, replaced


def measure(model_dir: Path, device: str, torch_nf4: bool, checkpointing: bool, steps: int, warmup: int) -> dict:
    import torch

    model, replaced = _model(model_dir, device, torch_nf4, checkpointing)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 128), generator=generator).to(device)
    times = []
    for _ in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # as in training: no KV cache
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    measured = times[warmup:]
    return {
        "variant": "torchnf4" if torch_nf4 else "bnb",
        "checkpointing": checkpointing,
        "layers": model.config.num_hidden_layers,
        "torch_nf4_layers": replaced,
        "step_ms_median": round(statistics.median(measured) * 1e3, 2),
        "step_ms_min": round(min(measured) * 1e3, 2),
        "step_ms_max": round(max(measured) * 1e3, 2),
        "steps_measured": len(measured),
    }


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp)
        for checkpointing in (False, True):
            rows = [
                measure(Path(tmp), args.device, nf4, checkpointing, args.steps, args.warmup) for nf4 in (False, True)
            ]
            for row in rows:
                row["vs_bnb"] = round(rows[0]["step_ms_median"] / row["step_ms_median"], 2)
                print(json.dumps({"host": _host(args.device), "device": args.device, **row}), flush=True)


if __name__ == "__main__":
    main()
