"""Stage 3: LoRA training on the NF4 base with TRL's SFTTrainer, resumable and content-addressed.

Where things live in the store (fp = training fingerprint):
    cache/adapter/<fp>/checkpoints/checkpoint-<step>/   adapter, optimizer, scheduler, RNG, trainer state;
                                                        `_COMPLETE` is written after all of it
    cache/adapter/<fp>/adapter/                          the final adapter + tokenizer + adapter_ref.json

The fingerprint covers the data, the base model, the LoRA and training settings that change the
result, and the code and library versions; an identical request returns the stored adapter, and a
run that died resumes from the newest complete checkpoint.

GPU work runs in a child process (`python -m tasks.train SPEC RESULT`) so that a timeout or a
cancellation kills it and frees the device, and its log lines stream into the Prefect run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from qlora_flow.artifacts import TrainingProgressArtifact
from qlora_flow.config import PipelineConfig
from qlora_flow.errors import is_retryable
from qlora_flow.fingerprint import code_version, combine, library_versions
from qlora_flow.lifeline import PARENT_PID_ENV, exit_with_parent
from qlora_flow.refs import AdapterRef, LossPoint, PreparedBase, ValidatedDataset
from qlora_flow.store import COMPLETE_MARKER, ArtifactStore, open_store
from qlora_flow.training_plan import ModelShape, TrainingPlan, plan_training, resolve_packing

log = logging.getLogger(__name__)

PROGRESS_PREFIX = "QLORA_FLOW_PROGRESS "
# Settings that do not change the trained weights (beyond float rounding) stay out of the fingerprint: they only
# choose how a step is computed (micro-batch split, recomputation, kernels, where activations wait).
_NON_RESULT_TRAINING_FIELDS = {
    "save_steps", "logging_steps", "compile", "offload", "gradient_checkpointing", "memory_budget_gib",
}

_LORA_VARIANT_DEFAULTS = {"use_dora": False, "use_rslora": False, "init": "default"}


def recipe_fingerprint(cfg: PipelineConfig) -> str:
    """The training settings alone (LoRA, training, quantization): what scheduled retraining compares."""
    training = cfg.training.model_dump(mode="json", exclude=_NON_RESULT_TRAINING_FIELDS)
    lora = cfg.lora.model_dump(mode="json")
    for name, default in _LORA_VARIANT_DEFAULTS.items():
        if lora[name] == default:  # plain LoRA keeps the recipe fingerprint it had before the variants existed
            del lora[name]
    return combine("recipe", lora, training, cfg.quantization)


def training_fingerprint(cfg: PipelineConfig, data: ValidatedDataset, base: PreparedBase) -> str:
    # `packing: auto` packs on GPUs only, and a packed row holds several examples: resolved, it names the recipe.
    packed = resolve_packing(cfg.training.packing, base.device)
    return combine(
        "adapter", data.fingerprint, base.fingerprint, recipe_fingerprint(cfg), {"packed": packed},
        code_version("tasks.train", "qlora_flow.models", "qlora_flow.hardware", "qlora_flow.training_plan"),
        library_versions(),
    )


def adapter_key(fingerprint: str) -> str:
    return f"cache/adapter/{fingerprint[:24]}"


def _complete_steps(store: ArtifactStore, checkpoints_key: str) -> list[int]:
    """Steps of the checkpoints that have their marker, newest first."""
    steps = []
    for key in store.list(checkpoints_key):
        match = re.search(r"checkpoint-(\d+)/" + COMPLETE_MARKER + "$", key)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps, reverse=True)


def newest_complete_checkpoint(store: ArtifactStore, checkpoints_key: str) -> tuple[int, str] | None:
    steps = _complete_steps(store, checkpoints_key)
    return (steps[0], f"{checkpoints_key}/checkpoint-{steps[0]}") if steps else None


def newest_verified_checkpoint(store: ArtifactStore, checkpoints_key: str) -> tuple[int, Path] | None:
    """The newest complete checkpoint whose files still match the sizes and SHA-256 its commit recorded.

    A checkpoint marked complete can be damaged later (full disk, a bad copy); resuming from it fails on
    every retry. A corrupt one is quarantined (see ArtifactStore.verified) and the next older one tried.
    """
    for step in _complete_steps(store, checkpoints_key):
        path = store.verified(f"{checkpoints_key}/checkpoint-{step}")
        if path is not None:
            return step, path
        log.warning("checkpoint at step %d failed verification; trying an older one", step)
    return None


def _training_template(tokenizer) -> str | None:
    """A chat template with `{% generation %}` markers, or None when assistant-only masking is impossible."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    from qlora_flow.models import chatml_training_template

    if has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template
    try:
        return get_training_chat_template(tokenizer) or tokenizer.chat_template
    except ValueError:
        return chatml_training_template(tokenizer.chat_template)


def _as_prompt_completion(example: dict) -> dict:
    messages = example["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


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


def run_training(
    cfg: PipelineConfig,
    store: ArtifactStore,
    data: ValidatedDataset,
    base: PreparedBase,
    on_progress: Callable[[dict], None] | None = None,
) -> AdapterRef:
    """Train (or resume) in this process. Use `train_adapter` for caching and process isolation.

    Each trainer log report goes to on_progress; without one it is printed for a parent process."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from qlora_flow.hardware import cap_gpu_memory, resolve_compute_dtype
    from qlora_flow.models import load_full_precision_model, load_nf4_model, load_tokenizer

    fingerprint = training_fingerprint(cfg, data, base)
    key = adapter_key(fingerprint)
    checkpoints_key = f"{key}/checkpoints"
    output_dir = store.workdir(checkpoints_key)
    rank = int(os.environ.get("RANK", "0"))

    device = base.device
    if device == "cuda":
        if "LOCAL_RANK" in os.environ:  # under torchrun: this rank's GPU becomes the default "cuda" device
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        if cfg.training.memory_budget_gib is not None:
            cap_gpu_memory(cfg.training.memory_budget_gib)
    compute_dtype = resolve_compute_dtype(base.compute_dtype, device)
    full_dir = store.fetch(store.key_of(base.full_precision_uri))
    tokenizer = load_tokenizer(full_dir)
    plan = make_plan(cfg, base, full_dir)
    log.info("training plan: %s", plan.as_dict())
    if base.nf4_uri:
        model = load_nf4_model(
            store.fetch(store.key_of(base.nf4_uri)), compute_dtype, device, attn_implementation=plan.attn_implementation
        )
    else:
        model = load_full_precision_model(full_dir, compute_dtype, device, attn_implementation=plan.attn_implementation)
    if plan.offload:
        from qlora_flow.speedups import input_embedding_on_cpu

        input_embedding_on_cpu(model)

    train_ds = datasets.Dataset.from_parquet(str(store.fetch_file(data.train_uri)))
    training_template = _training_template(tokenizer) if cfg.training.assistant_only_loss else None
    assistant_only = training_template is not None
    if cfg.training.assistant_only_loss and not assistant_only:
        # No template with generation markers: train on the final assistant turn only (prompt/completion).
        log.warning("chat template has no assistant markers; computing the loss on the last assistant turn only")
        train_ds = train_ds.map(_as_prompt_completion, remove_columns=["messages"])
    original_template = tokenizer.chat_template
    if assistant_only:
        tokenizer.chat_template = training_template

    gradient_checkpointing = plan.gradient_checkpointing
    t = cfg.training
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        per_device_train_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
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
        use_cpu=device == "cpu",
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        max_length=t.max_seq_length,
        packing=plan.packing,
        activation_offloading=plan.offload,
        assistant_only_loss=assistant_only,
        # "non_padding" counts ids != pad; a padding-free packed batch has no padding, and where the pad token is
        # also the end-of-turn token (SmolLM2's <|im_end|>) it would skip every real end of turn.
        include_num_input_tokens_seen="all" if plan.packing else "non_padding",
        report_to="none",
        disable_tqdm=True,
        # As in bench/train_gpu.py: collation off the GPU process's thread; on the CPU, workers only compete with it.
        dataloader_num_workers=2 if device == "cuda" else 0,
        # Every LoRA parameter is used in every step. Left unset, Trainer picks True for a PEFT model, and DDP
        # then walks the autograd graph after each backward looking for unused ones (the bench measured False).
        ddp_find_unused_parameters=False,
        eval_strategy="no",
    )
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

    class CheckpointCommitter(TrainerCallback):
        """Marks a checkpoint complete only after the trainer wrote all of it, then publishes it."""

        def on_save(self, args, state, control, **kwargs):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # the Trainer does not wait for the other ranks' RNG files before on_save; the marker records them
                torch.distributed.barrier()
            if state.is_world_process_zero:
                name = f"checkpoint-{state.global_step}"
                store.commit(f"{checkpoints_key}/{name}")
            return control

    class ProgressReporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and state.max_steps:
                report = {"step": state.global_step, "max_steps": state.max_steps, **(logs or {})}
                if on_progress:
                    on_progress(report)
                else:
                    print(PROGRESS_PREFIX + json.dumps(report), flush=True)
            return control

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[CheckpointCommitter(), ProgressReporter()],
    )
    # it prints each log dict raw; ProgressReporter's `[train] step ...` lines say the same, readably
    trainer.remove_callback(PrinterCallback)
    if plan.offload:
        from qlora_flow.speedups import offload_large_activations_only

        offload_large_activations_only(trainer)
    if plan.compile_layers:
        from qlora_flow.speedups import compile_decoder_layers

        compile_decoder_layers(trainer.model)
    trainable_params = [p for p in trainer.model.parameters() if p.requires_grad]
    if compute_dtype != torch.bfloat16:
        # TRL casts QLoRA adapters to bf16 unconditionally. In float32 compute (CPUs) bf16 adapters make every
        # step many times slower; under fp16 mixed precision (GPUs without bf16) the optimizer would update
        # bf16 weights. Adapters train in float32 (the optimizer does not exist yet).
        for param in trainable_params:
            param.data = param.data.to(torch.float32)
    trainable = sum(p.numel() for p in trainable_params)

    resume = newest_verified_checkpoint(store, checkpoints_key)
    resume_dir = None
    resumed_tokens = 0
    if resume is not None:
        resume_dir = str(resume[1])
        state = json.loads((Path(resume_dir) / "trainer_state.json").read_text())
        resumed_tokens = int(state.get("num_input_tokens_seen", 0))
        log.info("resuming from complete checkpoint at step %d", resume[0])
    _remove_incomplete_checkpoints(output_dir)

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_dir)
    seconds = time.perf_counter() - started

    history = [
        LossPoint(step=entry["step"], loss=entry["loss"], epoch=entry.get("epoch"))
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    tokens = int(trainer.state.num_input_tokens_seen)
    adapter_out_key = f"{key}/adapter"
    ref = AdapterRef(
        uri=store.uri(adapter_out_key),
        checkpoint_uri=store.uri(checkpoints_key),
        fingerprint=fingerprint,
        trainable_parameters=trainable,
        steps=trainer.state.global_step,
        loss_history=history,
        tokens_seen=tokens,
        train_seconds=round(seconds, 3),
        tokens_per_second=round((tokens - resumed_tokens) / seconds, 2) if seconds > 0 else 0.0,
        resumed_from_step=resume[0] if resume else None,
    )
    if rank == 0:
        out = store.workdir(adapter_out_key)
        trainer.model.save_pretrained(out)
        tokenizer.chat_template = original_template
        tokenizer.save_pretrained(out)
        # keys, not URIs: the reference stays valid when the store is copied or moved
        (out / "adapter_ref.json").write_text(json.dumps(store.as_keys(ref.model_dump(mode="json")), indent=2))
        store.commit(adapter_out_key)
    return ref


def _remove_incomplete_checkpoints(output_dir: Path) -> None:
    """A checkpoint without its marker was cut off mid-write; the trainer must never see it."""
    for path in output_dir.glob("checkpoint-*"):
        if path.is_dir() and not (path / COMPLETE_MARKER).exists():
            shutil.rmtree(path, ignore_errors=True)


class _TrainSpec(BaseModel):
    config: PipelineConfig
    data: ValidatedDataset
    base: PreparedBase


def _child_command(cfg: PipelineConfig, base: PreparedBase, spec_path: Path, result_path: Path) -> list[str]:
    if base.device == "cuda" and cfg.execution.gpus > 1:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={cfg.execution.gpus}", "-m", "tasks.train", str(spec_path), str(result_path),
        ]  # fmt: skip
    return [sys.executable, "-m", "tasks.train", str(spec_path), str(result_path)]


def run_training_in_child(
    cfg: PipelineConfig,
    data: ValidatedDataset,
    base: PreparedBase,
    on_line: Callable[[str], None] = print,
    on_progress: Callable[[dict], None] | None = None,
) -> AdapterRef:
    """Train in a child process group: logs stream to on_line; timeout or cancellation kills it."""
    with tempfile.TemporaryDirectory(prefix="qlora-train-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(_TrainSpec(config=cfg, data=data, base=base).model_dump_json())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
        project_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = project_root + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(
            _child_command(cfg, base, spec_path, result_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # its own process group, so killing it takes torchrun workers too
        )
        # A watchdog, not a check per log line: a child that hangs silently must be killed too.
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            _kill_group(proc)

        watchdog = threading.Timer(cfg.execution.train_timeout_s, on_timeout)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if line.startswith(PROGRESS_PREFIX):
                    if on_progress:
                        on_progress(json.loads(line[len(PROGRESS_PREFIX):]))
                elif line:
                    on_line(line)
            proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            watchdog.cancel()
        if timed_out.is_set():
            raise TimeoutError(f"training exceeded execution.train_timeout_s={cfg.execution.train_timeout_s}")
        if proc.returncode != 0:
            raise RuntimeError(f"training process exited with code {proc.returncode}; see the log lines above")
        return AdapterRef.model_validate_json(result_path.read_text())


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def train_adapter(
    cfg: PipelineConfig,
    store: ArtifactStore,
    data: ValidatedDataset,
    base: PreparedBase,
    on_line: Callable[[str], None] = print,
    on_progress: Callable[[dict], None] | None = None,
) -> AdapterRef:
    """Return the stored adapter for this exact request, or train (resuming if possible) and store it."""
    key = adapter_key(training_fingerprint(cfg, data, base))
    stored = store.verified(f"{key}/adapter")
    if stored is not None:
        log.info("adapter %s already trained; reusing it", key)
        return AdapterRef.model_validate(store.as_uris(json.loads((stored / "adapter_ref.json").read_text())))
    if cfg.execution.isolate_gpu_stages:
        return run_training_in_child(cfg, data, base, on_line, on_progress)
    return run_training(cfg, store, data, base, on_progress)


def _child_main(spec_path: str, result_path: str) -> None:
    # force: importing Prefect already gave the root logger a WARNING-level handler, which swallowed the
    # INFO lines (the training plan, resume points) that the parent streams into the Prefect run's logs.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)
    exit_with_parent()  # a SIGKILLed flow process must not leave this training holding the GPU
    spec = _TrainSpec.model_validate_json(Path(spec_path).read_text())
    ref = run_training(spec.config, open_store(spec.config.execution), spec.data, spec.base)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result_path).write_text(ref.model_dump_json())


def _cache_key(context, parameters) -> str:
    """Content fingerprint, valid only while the adapter it names is still in the store."""
    cfg, data, base = parameters["cfg"], parameters["data"], parameters["base"]
    store = open_store(cfg.execution)
    key = adapter_key(training_fingerprint(cfg, data, base))
    # Prefect stores results under the cache key, so it must be a plain name, not a path.
    if store.verified(f"{key}/adapter") is None:
        return f"train-pending-{time.time_ns()}"
    return "train-" + combine(store.root, key)[:32]


def training_lock_name(cfg: PipelineConfig, data: ValidatedDataset, base: PreparedBase) -> str:
    return "train:" + adapter_key(training_fingerprint(cfg, data, base)).rsplit("/", 1)[-1]


@contextmanager
def training_lock(name: str) -> Iterator[None]:
    """One training per adapter fingerprint at a time, across flow runs, deployments and hosts.

    Two runs asking for the same adapter (a manual trigger while the schedule runs, say) would write
    the same checkpoint directory. The second one waits here, then finds the adapter complete and
    reuses it. A Prefect global concurrency limit of 1, held under a lease the client keeps renewing.
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    with concurrency(name, occupy=1, strict=True):
        yield


@task(name="train_adapter", cache_key_fn=_cache_key, persist_result=True, retries=1, retry_delay_seconds=30, retry_condition_fn=is_retryable)
def train_adapter_task(cfg: PipelineConfig, data: ValidatedDataset, base: PreparedBase) -> AdapterRef:
    logger = get_run_logger()
    progress = TrainingProgressArtifact()

    def on_progress(report: dict) -> None:
        line = progress.update(report)
        if "loss" in report:
            logger.info(line)

    with training_lock(training_lock_name(cfg, data, base)):
        ref = train_adapter(cfg, open_store(cfg.execution), data, base, on_line=logger.info, on_progress=on_progress)
    progress.finish(ref.steps)
    return ref


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
