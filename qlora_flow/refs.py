"""Small references that stages hand to each other: where the files are, and what they contain.

A reference never carries a live model or tensor, so it can be cached, serialised into Prefect
results and handed to a stage running in another process or on another machine.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Ref(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ValidatedDataset(_Ref):
    train_uri: str
    eval_uri: str
    quarantine_uri: str | None = None
    report_uri: str
    n_input_rows: int
    n_train: int
    n_eval: int
    n_rejected: int
    source_format: str
    fingerprint: str = Field(description="Content hash of the normalised rows; independent of file format and order.")


class PreparedBase(_Ref):
    model_id: str
    architecture: str
    full_precision_uri: str = Field(description="16-bit checkpoint, used for merging and as the NF4 source.")
    nf4_uri: str | None = Field(None, description="Serialized NF4 checkpoint, loaded directly by later runs.")
    fingerprint: str
    compute_dtype: str
    device: str
    parameters: int
    footprint_bytes_16bit: int
    footprint_bytes_nf4: int | None = None
    load_seconds: float


class LossPoint(_Ref):
    step: int
    loss: float
    epoch: float | None = None
    eval_loss: float | None = None


class AdapterRef(_Ref):
    uri: str
    checkpoint_uri: str
    fingerprint: str
    trainable_parameters: int
    steps: int
    loss_history: list[LossPoint]
    tokens_seen: int
    train_seconds: float
    tokens_per_second: float
    resumed_from_step: int | None = None


class GateVerdict(_Ref):
    passed: bool
    reasons: list[str]


class EvalReport(_Ref):
    uri: str
    base_metrics: dict[str, float]
    tuned_metrics: dict[str, float]
    production_metrics: dict[str, float] | None = None
    samples_uri: str
    loss_plot_uri: str | None = None
    verdict: GateVerdict
    fingerprint: str | None = Field(None, description="Cache key of the measured numbers (qlora_flow.stage_cache).")


class MergedModel(_Ref):
    uri: str
    fingerprint: str
    dtype: str
    verification: dict[str, float | bool | int | str]


class GgufExport(_Ref):
    uri: str = Field(description="Directory of the GGUF files (runs/<run>/gguf).")
    files: dict[str, str] = Field(description="GGUF type (f16, q8_0) -> file name in that directory.")
    verification: dict[str, dict[str, float | int | bool]]


class PublishedModel(_Ref):
    run_uri: str
    manifest_uri: str
    model_uri: str
    alias_uri: str | None = None
    alias_moved: bool
    files: int
    total_bytes: int
    same_as_run: str | None = Field(
        None, description="Set when the alias already served an identical model: the run whose manifest it names."
    )
