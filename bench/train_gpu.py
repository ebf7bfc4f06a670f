"""Training throughput and memory: the baseline QLoRA recipe vs our training stage's defaults, one run.

    python bench/train_gpu.py --shape llama3-8b --workloads W1,W2 --profiles baseline,ours,budget40,lowmem
    python bench/train_gpu.py --workloads W2 --profiles ours,ours+ddp          # 1 GPU vs all visible GPUs
    python bench/train_gpu.py --workloads W1 --profiles ours,ours+liger,ours+compile,ours+prof
    python bench/train_gpu.py --workloads W1 --profiles seed,ours,unsloth,budget16,unsloth16 --time-limit-s 480

Every (workload, profile) pair runs in a fresh child process (clean peak-memory counters, enforced
memory budgets) on the same random-weight model, and prints one JSON line. Weight values do not
change speed or memory, so random weights of the named architecture stand in for the real model.

Baseline = the original example's settings with its bugs fixed: NF4 + double quantization, bf16,
gradient checkpointing, batch 4 x grad-accum 4, LoRA r=16 on all seven projections, padding to the
longest sequence in the batch, no packing. "ours" = what `qlora_flow.training_plan.plan_training`
picks for this GPU (the same function the training stage calls), with the stage's defaults: packing,
per-layer torch.compile, checkpointing and micro-batch chosen from the memory budget; `budget<N>`
is "ours" planned for and capped at N GiB (`lowmem` = 7 GiB).

Seed = the original example's recipe as written (the "seed recipe" of the README's performance section) where it still trains: the
baseline plus `prepare_model_for_kbit_training`, which upcasts the embeddings, norms and LM head to
float32 and turns on its own checkpointing, then `get_peft_model` (with the LoRA config).

Unsloth (`unsloth`, `unsloth<N>` for an N GiB cap) = FastLanguageModel on the same NF4 checkpoint with
the settings its notebooks document as best: `use_gradient_checkpointing="unsloth"`, LoRA dropout 0,
bias none, packing, 8-bit AdamW. It has no planner, so its micro-batch starts at the largest that
divides the global batch (at most 16 rows of 1,024 tokens, or the packed-row count) and the parent halves it
after an out-of-memory failure: the row reports the largest micro-batch that ran. Its packages
(`bash bench/fetch_wheels.sh unsloth`) are installed in their own directory, named by $UNSLOTH_SITE and
put first on the path of Unsloth's child processes only, because they pin older trl/datasets and
Unsloth patches transformers/TRL when imported.

A profile may carry modifiers after '+': `liger` (Liger's RMSNorm/SwiGLU/RoPE kernels through TRL),
`compile` / `nocompile` (force torch.compile of each decoder layer on / off), `nodrop` (LoRA dropout 0: shows dropout's share of the
step), `ddp` (DDP over all visible GPUs via torchrun, same global batch: grad-accum divided by the GPU
count), `prof` (torch profiler over two measured steps; the op table goes to $OUT or the current dir).
Candidates for a <= 7 GiB profile: `micro<N>` (N rows per micro-batch), `ckpt` / `nockpt` (force checkpointing on / off),
`cpuembed` (input embedding in CPU memory), `adam8bit` (paged 8-bit AdamW), `offload` (the planner's
offload: `cpuembed` plus TRL's activation offloading, tensors saved for backward wait in pinned CPU
memory; the planner picks it when nothing else fits the budget, as in the `lowmem` profile), `nopack`
(no packing, SDPA: on W1 every row is one whole sequence, so this isolates flex attention's cost),
`actoffload` (activation offloading alone, without `cpuembed`), `pageable` (the CPU embedding without
page-locked memory), `smalloffload` (TRL's default offload threshold of 1 KiB instead of ours), `fused` /
`nofused` (LoRA updates through qlora_flow/fused_lora.py on / off; the planner turns it on with compile).
Candidate the run 25 profile points at (16 GiB: the GPU idle 19% of the step, bitsandbytes' `gemm_4bit` costing
~250 us of Python per call), measured before it reaches the stage: `torchnf4` (the frozen NF4 projections
through qlora_flow/nf4_linear.py, dequantized by torch ops that inductor compiles into the layer's graph).

Workloads: W1 = uniform 1,024-token sequences; W2 = chat-like lengths, log-normal with median 250,
capped at 2,048. Tokens/s counts real (non-pad) tokens only. MFU counts 4 x params FLOPs per token
(frozen base: forward + input-gradient backward) plus causal attention, against 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.render_table import family_of, with_ratios

PEAK_BF16_FLOPS = 989e12
SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=4096,
    ),
}
MODIFIERS = {
    "liger",
    "compile",
    "nocompile",
    "nodrop",
    "ddp",
    "prof",
    "ckpt",
    "nockpt",
    "cpuembed",
    "adam8bit",
    "offload",
    "nopack",
    "actoffload",
    "pageable",
    "smalloffload",
    "fused",
    "nofused",
    "torchnf4",
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_model(shape: str, tokenizer=None):
    """A bf16 Llama of the named shape with random weights, built on the GPU when there is one. With a
    tokenizer, the vocabulary holds every id it can produce ("tiny" has 1,024, the test tokenizer 49,152)
    and its special tokens are set."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    settings = dict(SHAPES[shape])
    if tokenizer is not None:
        settings.update(
            vocab_size=max(settings["vocab_size"], len(tokenizer)),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**settings), dtype=torch.bfloat16)


def build_model_dirs(shape: str, root: Path) -> dict:
    """Random 16-bit checkpoint, then its NF4 checkpoint; returns the quantize and NF4-load times."""
    import torch
    from transformers import AutoModelForCausalLM

    full, nf4 = root / shape / "full", root / shape / "nf4"
    timings = {}
    if not (full / "config.json").exists():
        model = random_model(shape)
        model.save_pretrained(full)
        del model
    if not (nf4 / "config.json").exists():
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            full, quantization_config=_bnb(), dtype=torch.bfloat16, device_map={"": 0}
        )
        torch.cuda.synchronize()
        timings["quantize_from_16bit_s"] = round(time.perf_counter() - started, 2)
        model.save_pretrained(nf4)
        del model
        torch.cuda.empty_cache()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(nf4, dtype=torch.bfloat16, device_map={"": 0})
    torch.cuda.synchronize()
    timings["load_nf4_checkpoint_s"] = round(time.perf_counter() - started, 2)
    del model
    return timings


def _bnb():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def lengths_for(workload: str, n: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    if workload == "W1":
        return [1024] * n
    # log-normal, median 250 tokens, capped at 2,048
    return [max(16, min(2048, int(math.exp(rng.gauss(math.log(250), 0.9))))) for _ in range(n)]


def budget_of(profile: str) -> float | None:
    """The GiB cap a profile name asks for (None: the whole GPU)."""
    if profile == "lowmem":
        return 7.0
    digits = re.fullmatch(r"(?:budget|unsloth)(\d+)", profile)
    return float(digits.group(1)) if digits else None


def profile_settings(profile: str, shape: str, free_gib: float, workload: str, world: int = 1) -> dict:
    from qlora_flow.training_plan import ModelShape, plan_training

    cfg = SHAPES[shape]
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    inter, kv = cfg["intermediate_size"], cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + 2 * vocab * h
    model_shape = ModelShape(params, h, layers, vocab, cfg.get("tie_word_embeddings", False))
    if profile in ("baseline", "seed"):
        return dict(
            packing=False,
            gradient_checkpointing=True,
            compile=False,
            fused=False,
            offload=False,
            batch=4,
            accum=4 // world,
            attn="sdpa",
            budget_gib=None,
            plan=f"{profile} recipe",
            params=params,
            max_length=None,
        )
    if profile not in ("ours", "unsloth") and budget_of(profile) is None:
        raise SystemExit(f"unknown profile {profile!r}: baseline, seed, ours, budget<N>, lowmem, unsloth, unsloth<N>")
    budget = budget_of(profile) or free_gib
    # Packed rows as long as the baseline's longest sequence: 1,024 tokens per row on W1 keeps the tokens
    # per optimizer step equal to the baseline's (16 x 1,024).
    max_length = 1024 if workload == "W1" or profile == "lowmem" else 2048
    if family_of(profile) == "unsloth":
        # Packed rows of W2 hold ~8 examples: 16 x 1,024 tokens or 8 x 2,048 per micro-batch to start with.
        rows = 16 // world
        micro = min(rows, 16 if max_length == 1024 else 8)
        return dict(
            packing=True,
            gradient_checkpointing=True,
            compile=False,
            fused=False,
            offload=False,
            batch=micro,
            accum=rows // micro,
            attn="unsloth",
            budget_gib=budget_of(profile),
            plan="unsloth documented defaults",
            params=params,
            max_length=max_length,
        )
    plan = plan_training(
        device="cuda",
        shape=model_shape,
        max_seq_length=max_length,
        batch_size=4,
        grad_accum=4,
        memory_budget_gib=budget,
        world_size=world,
    )
    return dict(
        packing=plan.packing,
        gradient_checkpointing=plan.gradient_checkpointing,
        compile=plan.compile_layers,
        fused=plan.fused_lora,
        offload=plan.offload,
        batch=plan.per_device_batch_size,
        accum=plan.gradient_accumulation_steps,
        attn=plan.attn_implementation,
        budget_gib=None if profile == "ours" else budget,
        plan=plan.reason,
        params=params,
        max_length=max_length,
    )


def split_profile(profile: str) -> tuple[str, set[str]]:
    name, *modifiers = profile.split("+")
    unknown = {m for m in modifiers if m not in MODIFIERS and not re.fullmatch(r"micro\d+", m)}
    if unknown:
        raise SystemExit(f"unknown profile modifier(s) {sorted(unknown)}; known: {sorted(MODIFIERS)}")
    return name, set(modifiers)


def run_one(args) -> dict:
    family = family_of(args.profile)
    if family == "unsloth":  # it patches transformers, peft and TRL when imported, so before them
        import unsloth  # noqa: F401
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from qlora_flow.fused_lora import apply_fused_lora
    from qlora_flow.speedups import compile_decoder_layers, input_embedding_on_cpu, offload_large_activations_only
    from qlora_flow.training_backends import training_backend

    # The bench builds TRL's SFTTrainer itself, so its step settings come from the trl backend's recipe.
    step_arguments = training_backend("trl").step_arguments

    name, modifiers = split_profile(args.profile)
    local_rank, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.cuda.set_device(local_rank)
    free, total = torch.cuda.mem_get_info()
    # Same global batch on any GPU count: each GPU accumulates fewer micro-batches.
    settings = profile_settings(name, args.shape, free / 2**30, args.workload, world)
    if settings["budget_gib"]:
        torch.cuda.set_per_process_memory_fraction(settings["budget_gib"] * 2**30 / total)
    global_batch = settings["batch"] * settings["accum"] * world
    for m in modifiers:  # micro<N>: force N rows per micro-batch at the same global batch
        if m.startswith("micro"):
            settings["batch"], settings["accum"] = int(m[5:]), global_batch // (int(m[5:]) * world)
    if "ckpt" in modifiers:
        settings["gradient_checkpointing"] = True
    if "nockpt" in modifiers:
        settings["gradient_checkpointing"] = False
    if "offload" in modifiers:
        settings["offload"] = True
    if "nopack" in modifiers:  # the baseline's batching (pad to longest) and attention (SDPA) in this profile
        settings.update(packing=False, attn="sdpa")
    if int(os.environ.get("RANK", "0")) == 0:  # the parent reads the micro-batch when this child runs out of memory
        print("SETTINGS " + json.dumps({"micro_batch": settings["batch"]}), flush=True)
    nf4 = Path(args.root) / args.shape / "nf4"
    # Data is pre-tokenized; the tokenizer only supplies the pad token.
    tokenizer_dir = Path(__file__).resolve().parent.parent / "tests/fixtures/tokenizer"
    dropout = 0.0 if "nodrop" in modifiers or family == "unsloth" else 0.05
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    if family == "unsloth":
        model, tokenizer = _unsloth_model(nf4, tokenizer_dir, settings["max_length"], dropout)
        lora = None
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(
            nf4, dtype=torch.bfloat16, device_map={"": local_rank}, attn_implementation=settings["attn"]
        )
    if family == "seed":  # the example's lines: upcast to float32 and its checkpointing, then the adapter
        from peft import get_peft_model, prepare_model_for_kbit_training

        model = get_peft_model(prepare_model_for_kbit_training(model, use_gradient_checkpointing=True), lora)
        lora = None
    if "cpuembed" in modifiers or settings["offload"]:
        input_embedding_on_cpu(model, pinned="pageable" not in modifiers)
    activation_offloading = settings["offload"] or "actoffload" in modifiers
    steps = args.warmup + args.steps
    vocab = SHAPES[args.shape]["vocab_size"]
    # Packing fills rows up to 2,048 tokens, so it needs fewer rows: give every profile the same examples.
    lengths = lengths_for(args.workload, global_batch * steps * (8 if settings["packing"] else 1))
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(100, vocab, (n,), generator=gen).tolist()} for n in lengths]
    dataset = datasets.Dataset.from_list(rows)

    step_times, step_tokens = [], []
    profiler = _profiler(args.warmup) if "prof" in modifiers else None

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            torch.cuda.synchronize()
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, a, state, control, **kw):
            torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t0)
            # Gathered over all ranks by the Trainer, so this is the global count under DDP.
            step_tokens.append(state.num_input_tokens_seen - self.tok0)
            if profiler is not None:
                profiler.step()

    # How a step is computed comes from the pipeline's recipe (the same batch split, checkpointing, packing,
    # offloading and token counting); the rest is the benchmark's own.
    step_args = step_arguments(
        batch=settings["batch"],
        accum=settings["accum"],
        packing=settings["packing"],
        offload=activation_offloading,
        # Unsloth's own checkpointing was set up by get_peft_model; TRL's would wrap the layers a second time.
        checkpointing=settings["gradient_checkpointing"] and family != "unsloth",
        device="cuda",
    )
    sft = SFTConfig(
        output_dir=f"/tmp/bench-out-{os.getpid()}",
        max_steps=steps,
        learning_rate=2e-4,
        bf16=True,
        max_length=settings["max_length"] if settings["packing"] else (2048 if args.workload == "W2" else 1024),
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        completion_only_loss=False,
        use_liger_kernel="liger" in modifiers,
        **(
            {"optim": "paged_adamw_8bit"}
            if "adam8bit" in modifiers
            else {"optim": "adamw_8bit"}
            if family == "unsloth"
            else {}
        ),
        **step_args,
    )
    trainer = SFTTrainer(
        model=model, args=sft, train_dataset=dataset, processing_class=tokenizer, peft_config=lora, callbacks=[Timer()]
    )
    if activation_offloading and "smalloffload" not in modifiers:
        offload_large_activations_only(trainer)
    torch_nf4_layers = 0
    if "torchnf4" in modifiers:  # before compile, so that the dequantization is part of each layer's graph
        from qlora_flow.nf4_linear import apply_torch_nf4

        torch_nf4_layers = apply_torch_nf4(trainer.model)
    fused = (settings["fused"] or "fused" in modifiers) and "nofused" not in modifiers
    fused_layers = apply_fused_lora(trainer.model) if fused else 0
    compile_layers = (settings["compile"] or "compile" in modifiers) and "nocompile" not in modifiers
    compiled_layers = compile_decoder_layers(trainer.model) if compile_layers else 0
    torch.cuda.reset_peak_memory_stats()
    if profiler is not None:
        profiler.start()
    trainer.train()
    if profiler is not None:
        profiler.stop()
        _write_profile(profiler, args, step_times)

    measured_t, measured_tok = step_times[args.warmup :], step_tokens[args.warmup :]
    if not all(measured_tok):
        raise RuntimeError(f"the trainer counted no input tokens in some measured steps: {measured_tok}")
    tokens_per_s = sum(measured_tok) / sum(measured_t)
    cfg = SHAPES[args.shape]
    mean_len = statistics.mean(lengths)
    attn_flops = 3 * 2 * cfg["num_hidden_layers"] * cfg["hidden_size"] * mean_len  # causal QK^T + AV, fwd+bwd
    flops_per_token = 4 * settings["params"] + attn_flops
    return {
        "shape": args.shape,
        "workload": args.workload,
        "profile": args.profile,
        "plan": settings["plan"],
        "gpus": world,
        "lora_dropout": dropout,
        "compiled_layers": compiled_layers,
        "fused_lora_layers": fused_layers,
        **({"torch_nf4_layers": torch_nf4_layers} if torch_nf4_layers else {}),
        "packing": settings["packing"],
        "gradient_checkpointing": settings["gradient_checkpointing"],
        "offload": settings["offload"],
        "micro_batch": settings["batch"],
        "grad_accum": settings["accum"],
        "attn": settings["attn"],
        "memory_budget_gib": settings["budget_gib"],
        "real_tokens_per_s": round(tokens_per_s, 1),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "mfu": round(tokens_per_s * flops_per_token / PEAK_BF16_FLOPS / world, 4),
        "step_s_mean": round(statistics.mean(measured_t), 3),
        "step_s_min": round(min(measured_t), 3),
        "step_s_median": round(statistics.median(measured_t), 3),
        "step_s_max": round(max(measured_t), 3),
        "step_s_cv": round(statistics.pstdev(measured_t) / statistics.mean(measured_t), 3),
        "steps_measured": len(measured_t),
        "real_tokens_per_step": round(statistics.mean(measured_tok)),
        "mean_example_tokens": round(mean_len, 1),
    }


def _unsloth_model(nf4: Path, tokenizer_dir: Path, max_length: int, dropout: float):
    """FastLanguageModel on the NF4 checkpoint with Unsloth's documented best training settings."""
    import torch
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(nf4),
        tokenizer_name=str(tokenizer_dir),
        max_seq_length=max_length,
        dtype=torch.bfloat16,
        load_in_4bit=True,
        fix_tokenizer=False,
        use_exact_model_name=True,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=dropout,
        bias="none",
        target_modules=TARGETS,
        use_gradient_checkpointing="unsloth",
        random_state=3407,
    )
    return model, tokenizer


def _profiler(warmup: int):
    from torch.profiler import ProfilerActivity, profile, schedule

    # Skip the warm-up steps, then record two optimizer steps.
    return profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=max(warmup - 1, 0), warmup=1, active=2, repeat=1),
    )


def _write_profile(profiler, args, step_times: list[float]) -> None:
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    # Kernels only: an operator's row repeats the time of the kernels it launched (headers up to run 25 summed
    # both; their footer's "Self CUDA time total" is the kernel time).
    cuda_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    out = (
        Path(os.environ.get("OUT", ".")) / f"profile-{args.shape}-{args.workload}-{args.profile.replace('+', '_')}.txt"
    )
    recorded = step_times[args.warmup : args.warmup + 2]
    wall = sum(recorded)
    header = (
        f"two steps, wall {wall:.3f} s, kernel time {cuda_us / 1e6:.3f} s = {cuda_us / 1e6 / wall:.0%} of the wall "
        "(below 100%: the GPU waited for the CPU; above: kernels overlapped on several streams)\n\n"
    )
    out.write_text(header + events.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90))


def _child_command(args, workload: str, profile: str) -> list[str]:
    script = [
        __file__,
        "--shape",
        args.shape,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--root",
        args.root,
        "--child",
        workload,
        profile,
    ]
    if "ddp" in split_profile(profile)[1]:
        import torch

        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torch.cuda.device_count()}"]
        return [sys.executable, *launcher, *script]
    # One process seeing several GPUs would make the Trainer use nn.DataParallel: pin it to the first.
    env = [f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0]}"]
    if family_of(profile) == "unsloth" and os.environ.get("UNSLOTH_SITE"):
        env.append(
            f"PYTHONPATH={os.pathsep.join(filter(None, [os.environ['UNSLOTH_SITE'], os.environ.get('PYTHONPATH')]))}"
        )
    return ["env", *env, sys.executable, *script]


def measure(args, workload: str, profile: str, deadline: float) -> dict:
    """One row in a child process, killed at the deadline. An Unsloth row that runs out of memory is run
    again with half the micro-batch (its best setting is the largest that fits; it has no planner)."""
    tried, requested, started = [], profile, time.monotonic()
    while True:
        command = _child_command(args, workload, profile)
        try:
            left = None if deadline == float("inf") else max(deadline - time.monotonic(), 1)
            proc = subprocess.run(command, capture_output=True, text=True, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            return {"shape": args.shape, "workload": workload, "profile": profile, "error": "time limit: row killed"}
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is not None:
            result = {**json.loads(line[len("RESULT ") :]), "profile": requested}
            # The row's wall time, process start and compilation included: what a 10-minute window must fit.
            result["row_s"] = round(time.monotonic() - started, 1)
            return {**result, **({"out_of_memory_micro_batches": tried} if tried else {})}
        error = (proc.stderr or proc.stdout)[-1500:]
        micro = re.search(r'^SETTINGS \{"micro_batch": (\d+)\}', proc.stdout, re.MULTILINE)
        if family_of(profile) != "unsloth" or "out of memory" not in error.lower() or not micro or micro[1] == "1":
            return {"shape": args.shape, "workload": workload, "profile": requested, "error": error}
        tried.append(int(micro[1]))
        name, modifiers = split_profile(profile)
        modifiers = {m for m in modifiers if not m.startswith("micro")} | {f"micro{int(micro[1]) // 2}"}
        profile = "+".join([name, *sorted(modifiers)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--profiles", default="baseline,ours")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--root", default="/tmp/bench-models")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "PROFILE"))
    parser.add_argument("--build-only", action="store_true", help="build the model dirs, time NF4 loading, stop")
    parser.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="stop here: a row still running is killed and reported as an error, later rows skipped",
    )
    args = parser.parse_args()
    if args.child:
        args.workload, args.profile = args.child
        result = run_one(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    deadline = time.monotonic() + (args.time_limit_s or float("inf"))
    if args.build_only:
        timings = build_model_dirs(args.shape, Path(args.root))
        print(json.dumps({"shape": args.shape, **timings}), flush=True)
        return
    # In a child: the NF4 load it times would otherwise keep ~6 GiB of this GPU (CUDA context and cached
    # blocks) for the whole run, and the whole-GPU rows plan for what is free.
    build = [sys.executable, __file__, "--shape", args.shape, "--root", args.root, "--build-only"]
    print(subprocess.run(build, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
    results = []
    for workload in args.workloads.split(","):
        for profile in args.profiles.split(","):
            if time.monotonic() >= deadline:
                result = {"shape": args.shape, "workload": workload, "profile": profile, "error": "time limit: not run"}
            else:
                result = measure(args, workload, profile, deadline)
            results.append(result)
            print(json.dumps(result), flush=True)
    ok = [r for r in results if "error" not in r]
    for r in with_ratios(ok):
        ratios = {k: round(v, 2) for k, v in r.items() if k.startswith("vs_")}
        print(
            json.dumps(
                {
                    "ratios": r["profile"],
                    "workload": r["workload"],
                    **ratios,
                    "peak_reserved_gib": r["peak_reserved_gib"],
                }
            )
        )


if __name__ == "__main__":
    main()
