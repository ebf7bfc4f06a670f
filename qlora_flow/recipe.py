"""The training recipe: local paths and a plan in, an adapter directory and statistics out.

One backend today: TRL's SFTTrainer on a PEFT LoRA model, QLoRA when the base is an NF4 checkpoint.
No artifact store and no Prefect in here: the training stage (tasks/train.py) downloads the inputs,
picks the checkpoint to resume from, calls `train_lora` in its child process (one per rank under
torchrun) and uploads what it wrote. `bench/train_gpu.py` builds its SFTConfig from the same
`step_arguments`, so a change to how a step is computed reaches both.

The contract a second backend keeps (a new module beside this one, chosen by a config switch):

- inputs: the `PipelineConfig` (`lora`, `training`), the `TrainingPlan` of `make_plan`, and
  `RecipeInputs`: the 16-bit base directory (config, tokenizer, and the weights when there is no NF4
  checkpoint), the NF4 directory or None, the train split (parquet, a `messages` column of chat turns),
  the compute dtype and device, the checkpoint and adapter directories, and the checkpoint to resume from.
- adapter directory (written by rank 0 only): a PEFT adapter (`adapter_config.json`,
  `adapter_model.safetensors`) that `PeftModel.from_pretrained` loads onto the 16-bit base, and the
  tokenizer saved with the chat template inference uses (not a training-only template). Evaluation,
  merge, export and publish read exactly this.
- checkpoints: `checkpoint-<step>/` under the checkpoint directory with everything a resume needs and a
  `trainer_state.json` holding `num_input_tokens_seen`; `on_checkpoint(name)` is called on rank 0 once
  every rank finished writing it (the stage then marks it complete). Given `resume_from` (a checkpoint
  this recipe wrote), training continues from it to the same result as an uninterrupted run.
- statistics: `TrainingStats` (optimizer steps, loss per logged step, tokens seen, seconds, tokens per
  second counting only this run's tokens, trainable parameters).
- progress: `on_log(report)` with `step`, `max_steps` and the logged numbers, on rank 0.

The adapter fingerprint hashes this module (with qlora_flow.models, .hardware, .training_plan and
.training_template), not the stage around it: editing the Prefect glue never retrains.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qlora_flow.config import PipelineConfig
from qlora_flow.refs import LossPoint, PreparedBase
from qlora_flow.training_plan import ModelShape, TrainingPlan, plan_training
from qlora_flow.training_template import training_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecipeInputs:
    base_dir: Path  # 16-bit base: config and tokenizer; the trained-on weights when nf4_dir is None
    nf4_dir: Path | None  # serialized NF4 checkpoint of the same base (QLoRA)
    train_file: Path  # parquet with a `messages` column
    compute_dtype: str  # requested compute dtype name (see qlora_flow.hardware.resolve_compute_dtype)
    device: str  # "cuda" or "cpu"
    checkpoint_dir: Path
    adapter_dir: Path
    resume_from: Path | None = None


@dataclass(frozen=True)
class TrainingStats:
    trainable_parameters: int
    steps: int
    loss_history: list[LossPoint]
    tokens_seen: int
    train_seconds: float
    tokens_per_second: float


def make_plan(cfg: PipelineConfig, base: PreparedBase, model_dir: Path) -> TrainingPlan:
    """The training profile for this hardware: see qlora_flow.training_plan."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    shape = ModelShape(base.parameters, config.hidden_size, config.num_hidden_layers, config.vocab_size, tied)
    budget = cfg.training.memory_budget_gib
    if base.device == "cuda" and budget is None:
        import torch

        free, _ = torch.cuda.mem_get_info()  # the current GPU: this rank's, or the flow run's leased one
        budget = free / 2**30
    t = cfg.training
    return plan_training(
        device=base.device,
        shape=shape,
        max_seq_length=t.max_seq_length,
        batch_size=t.per_device_batch_size,
        grad_accum=t.gradient_accumulation_steps,
        checkpointing=t.gradient_checkpointing,
        packing=t.packing,
        memory_budget_gib=budget,
        quantized=base.nf4_uri is not None,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        compile_layers=t.compile,
        offload=t.offload,
    )


def prepare_device(device: str, memory_budget_gib: float | None) -> None:
    """Before planning: under torchrun this rank's GPU becomes the default "cuda" device, and a memory
    budget caps what this process may allocate."""
    if device != "cuda":
        return
    import torch

    from qlora_flow.hardware import cap_gpu_memory

    if "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if memory_budget_gib is not None:
        cap_gpu_memory(memory_budget_gib)


def step_arguments(
    *, batch: int, accum: int, checkpointing: bool, packing: bool, offload: bool, device: str
) -> dict[str, object]:
    """SFTConfig arguments that decide how one optimizer step is computed (shared with bench/train_gpu.py)."""
    from transformers import TrainingArguments

    # transformers 5.25 renamed gradient_checkpointing* to activation_checkpointing* and warns on the old names,
    # which earlier 5.x releases still need. TRL's default for the old name is True: always set one explicitly.
    renamed = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    checkpointing_name = "activation_checkpointing" if renamed else "gradient_checkpointing"
    return {
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accum,
        checkpointing_name: checkpointing,
        f"{checkpointing_name}_kwargs": {"use_reentrant": False} if checkpointing else None,
        "packing": packing,
        "activation_offloading": offload,
        # "non_padding" counts ids != pad; a padding-free packed batch has no padding, and where the pad token is
        # also the end-of-turn token (SmolLM2's <|im_end|>) it would skip every real end of turn.
        "include_num_input_tokens_seen": "all" if packing else "non_padding",
        # Collation off the GPU process's thread; on the CPU, workers only compete with it.
        "dataloader_num_workers": 2 if device == "cuda" else 0,
        # Every LoRA parameter is used in every step. Left unset, Trainer picks True for a PEFT model, and DDP
        # then walks the autograd graph after each backward looking for unused ones (the bench measured False).
        "ddp_find_unused_parameters": False,
    }


def _sft_config(cfg: PipelineConfig, plan: TrainingPlan, inputs: RecipeInputs, compute_dtype, assistant_only: bool):
    import torch
    from trl import SFTConfig

    t = cfg.training
    return SFTConfig(
        output_dir=str(inputs.checkpoint_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=3,
        seed=t.seed,
        data_seed=t.seed,
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=inputs.device == "cpu",
        max_length=t.max_seq_length,
        assistant_only_loss=assistant_only,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **step_arguments(
            batch=plan.per_device_batch_size,
            accum=plan.gradient_accumulation_steps,
            checkpointing=plan.gradient_checkpointing,
            packing=plan.packing,
            offload=plan.offload,
            device=inputs.device,
        ),
    )


def _load_model(plan: TrainingPlan, inputs: RecipeInputs, compute_dtype):
    from qlora_flow.models import load_full_precision_model, load_nf4_model

    attn = plan.attn_implementation
    if inputs.nf4_dir is not None:
        model = load_nf4_model(inputs.nf4_dir, compute_dtype, inputs.device, attn_implementation=attn)
    else:
        model = load_full_precision_model(inputs.base_dir, compute_dtype, inputs.device, attn_implementation=attn)
    if plan.offload:
        from qlora_flow.speedups import input_embedding_on_cpu

        input_embedding_on_cpu(model)
    return model


def _as_prompt_completion(example: dict) -> dict:
    messages = example["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _callbacks(on_checkpoint: Callable[[str], None], on_log: Callable[[dict], None] | None) -> list:
    import torch
    from transformers import TrainerCallback

    class CheckpointCommitter(TrainerCallback):
        """Reports a checkpoint only after every rank wrote all of it."""

        def on_save(self, args, state, control, **kwargs):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # the Trainer does not wait for the other ranks' RNG files before on_save; the marker records them
                torch.distributed.barrier()
            if state.is_world_process_zero:
                on_checkpoint(f"checkpoint-{state.global_step}")
            return control

    class ProgressReporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log is not None and state.is_world_process_zero and state.max_steps:
                on_log({"step": state.global_step, "max_steps": state.max_steps, **(logs or {})})
            return control

    return [CheckpointCommitter(), ProgressReporter()]


def _trainable_in_float32(model, compute_dtype) -> int:
    """TRL casts QLoRA adapters to bf16 unconditionally. In float32 compute (CPUs) bf16 adapters make every
    step many times slower; under fp16 mixed precision (GPUs without bf16) the optimizer would update bf16
    weights. Adapters train in float32 (the optimizer does not exist yet). Returns the trainable count."""
    import torch

    trainable_params = [p for p in model.parameters() if p.requires_grad]
    if compute_dtype != torch.bfloat16:
        for param in trainable_params:
            param.data = param.data.to(torch.float32)
    return sum(p.numel() for p in trainable_params)


def train_lora(
    cfg: PipelineConfig,
    plan: TrainingPlan,
    inputs: RecipeInputs,
    on_checkpoint: Callable[[str], None] = lambda name: None,
    on_log: Callable[[dict], None] | None = None,
) -> TrainingStats:
    """Train (or resume) a LoRA adapter in this process; see the module docstring for the contract."""
    import datasets
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import SFTTrainer

    from qlora_flow.hardware import resolve_compute_dtype
    from qlora_flow.models import load_tokenizer

    compute_dtype = resolve_compute_dtype(inputs.compute_dtype, inputs.device)
    tokenizer = load_tokenizer(inputs.base_dir)
    log.info("training plan: %s", plan.as_dict())
    model = _load_model(plan, inputs, compute_dtype)

    train_ds = datasets.Dataset.from_parquet(str(inputs.train_file))
    template = training_template(tokenizer) if cfg.training.assistant_only_loss else None
    assistant_only = template is not None
    if cfg.training.assistant_only_loss and not assistant_only:
        # No template with generation markers: train on the final assistant turn only (prompt/completion).
        log.warning("chat template has no assistant markers; computing the loss on the last assistant turn only")
        train_ds = train_ds.map(_as_prompt_completion, remove_columns=["messages"])
    original_template = tokenizer.chat_template
    if assistant_only:
        tokenizer.chat_template = template

    peft_config = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias=cfg.lora.bias,
        use_dora=cfg.lora.use_dora,
        use_rslora=cfg.lora.use_rslora,
        init_lora_weights=True if cfg.lora.init == "default" else cfg.lora.init,
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(cfg, plan, inputs, compute_dtype, assistant_only),
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=_callbacks(on_checkpoint, on_log),
    )
    # it prints each log dict raw; the stage's progress lines (`[train] step ...`) say the same, readably
    trainer.remove_callback(PrinterCallback)
    if plan.offload:
        from qlora_flow.speedups import offload_large_activations_only

        offload_large_activations_only(trainer)
    if plan.fused_lora:
        from qlora_flow.fused_lora import apply_fused_lora

        apply_fused_lora(trainer.model)
    if plan.compile_layers:
        from qlora_flow.speedups import compile_decoder_layers

        compile_decoder_layers(trainer.model)
    trainable = _trainable_in_float32(trainer.model, compute_dtype)

    resumed_tokens = 0
    if inputs.resume_from is not None:
        state = json.loads((Path(inputs.resume_from) / "trainer_state.json").read_text())
        resumed_tokens = int(state.get("num_input_tokens_seen", 0))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(inputs.resume_from) if inputs.resume_from is not None else None)
    seconds = time.perf_counter() - started

    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(inputs.adapter_dir)
        tokenizer.chat_template = original_template
        tokenizer.save_pretrained(inputs.adapter_dir)
    tokens = int(trainer.state.num_input_tokens_seen)
    return TrainingStats(
        trainable_parameters=trainable,
        steps=trainer.state.global_step,
        loss_history=[
            LossPoint(step=entry["step"], loss=entry["loss"], epoch=entry.get("epoch"))
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
        tokens_seen=tokens,
        train_seconds=round(seconds, 3),
        tokens_per_second=round((tokens - resumed_tokens) / seconds, 2) if seconds > 0 else 0.0,
    )
