"""Fingerprints of the stage results, and the cache entries of the stages after training.

    cache/eval/<fp>/entry.json     what evaluating cost: base and tuned metrics and answers. Not the gate
                                   verdict: the gate compares against whatever `production` is at the time,
                                   so every run decides it again from these numbers (milliseconds).
    cache/merged/<fp>/entry.json   where the verified merged model of this adapter + merge settings is
                                   stored (the `runs/<run-id>/model/` of the run that merged it), so one
                                   model is stored once however many runs produce it.

An entry is written through the store's workdir/commit, so it counts only once its completion marker
exists; an entry that cannot be read is set aside with a WARNING and the stage runs again. An entry stored
under the fingerprint of earlier code declared equivalent (qlora_flow.code_lineage) is found too (`find_entry`).
"""

from __future__ import annotations

import json
import logging
from typing import TypeVar

from pydantic import BaseModel

from qlora_flow.code_lineage import code_hashes, find_result
from qlora_flow.config import PipelineConfig
from qlora_flow.fingerprint import combine, library_versions
from qlora_flow.layout import CACHE_ENTRY_NAME, cache_key
from qlora_flow.refs import AdapterRef, MergedModel, PreparedBase, ValidatedDataset
from qlora_flow.store import ArtifactStore
from qlora_flow.training_backends import DEFAULT_BACKEND

log = logging.getLogger(__name__)

Entry = TypeVar("Entry", bound=BaseModel)


# Settings that do not change the trained weights (beyond float rounding) stay out of the fingerprint: they only
# choose how a step is computed (micro-batch split, recomputation, kernels, where activations wait).
_NON_RESULT_TRAINING_FIELDS = {
    "save_steps",
    "logging_steps",
    "compile",
    "offload",
    "gradient_checkpointing",
    "memory_budget_gib",
}


# Fields added after adapters were cached: at their default they stay out, so plain LoRA trained by TRL keeps the
# recipe fingerprint it had before the LoRA variants and the backend switch existed.
_LORA_VARIANT_DEFAULTS = {"use_dora": False, "use_rslora": False, "init": "default"}
_TRAINING_LATER_DEFAULTS = {"backend": DEFAULT_BACKEND}


def _without_defaults(section: dict, defaults: dict) -> dict:
    return {name: value for name, value in section.items() if name not in defaults or value != defaults[name]}


def recipe_fingerprint(cfg: PipelineConfig) -> str:
    """The training settings alone (LoRA, training, quantization): what scheduled retraining compares."""
    training = cfg.training.model_dump(mode="json", exclude=_NON_RESULT_TRAINING_FIELDS)
    lora = cfg.lora.model_dump(mode="json")
    return combine(
        "recipe",
        _without_defaults(lora, _LORA_VARIANT_DEFAULTS),
        _without_defaults(training, _TRAINING_LATER_DEFAULTS),
        cfg.quantization,
    )


class Measurement(BaseModel):
    """Evaluation numbers of one adapter on one eval split under one set of evaluation settings."""

    base_metrics: dict[str, float]
    tuned_metrics: dict[str, float]
    base_answers: list[str]
    tuned_answers: list[str]


class MergeEntry(BaseModel):
    merged: MergedModel
    run_id: str  # the run that merged it, whose model directory merged.uri names


def evaluation_fingerprints(
    cfg: PipelineConfig, data: ValidatedDataset, base: PreparedBase, adapter: AdapterRef
) -> list[str]:
    """What the measured numbers depend on: adapter, eval split (in the data fp), base and where it computes,
    evaluation settings except the gate, code and libraries. Today's first, then earlier code's (code_lineage)."""
    return [
        combine(
            "evaluation",
            adapter.fingerprint,
            data.fingerprint,
            base.fingerprint,
            base.compute_dtype,
            base.device,
            cfg.evaluation.model_dump(mode="json", exclude={"gate"}),
            code,
            library_versions(),
        )
        for code in code_hashes("evaluation")
    ]


def evaluation_fingerprint(cfg: PipelineConfig, data: ValidatedDataset, base: PreparedBase, adapter: AdapterRef) -> str:
    return evaluation_fingerprints(cfg, data, base, adapter)[0]


def merge_fingerprints(
    cfg: PipelineConfig, base: PreparedBase, adapter: AdapterRef, data: ValidatedDataset | None
) -> list[str]:
    """What the merged model and its verification depend on: adapter, base, merge settings, the verification
    budget (evaluation.max_new_tokens) and prompts (eval split, else the report's samples), code and libraries.
    Today's first, then earlier code's (code_lineage)."""
    return [
        combine(
            "merge",
            adapter.fingerprint,
            base.fingerprint,
            base.device,
            cfg.merge,
            cfg.evaluation.max_new_tokens,
            data.fingerprint if data else "eval-report-samples",
            code,
            library_versions(),
        )
        for code in code_hashes("merge")
    ]


def merge_fingerprint(
    cfg: PipelineConfig, base: PreparedBase, adapter: AdapterRef, data: ValidatedDataset | None
) -> str:
    return merge_fingerprints(cfg, base, adapter, data)[0]


def entry_key(kind: str, fingerprint: str) -> str:
    return cache_key(kind, fingerprint)


def read_entry(store: ArtifactStore, kind: str, fingerprint: str, model: type[Entry]) -> Entry | None:
    """The committed entry, or None when there is none or it cannot be read (then it is rebuilt)."""
    key = entry_key(kind, fingerprint)
    if store.verified(key) is None:  # absent, or corrupt and set aside in quarantine/
        return None
    try:
        return model.model_validate(store.as_uris(json.loads(store.read_bytes(f"{key}/{CACHE_ENTRY_NAME}"))))
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        log.warning("cache entry %s is unreadable (%s); computing it again", store.uri(key), exc)
        return None


def find_entry(
    store: ArtifactStore, kind: str, fingerprints: list[str], model: type[Entry]
) -> tuple[str, Entry] | None:
    """The entry for fingerprints[0] and the fingerprint it is stored under, which may be an earlier code's
    (qlora_flow.code_lineage.find_result); None when there is none to use."""
    return find_result(store, kind, fingerprints, lambda fingerprint: read_entry(store, kind, fingerprint, model))


def write_entry(store: ArtifactStore, kind: str, fingerprint: str, entry: BaseModel) -> str:
    key = entry_key(kind, fingerprint)
    out = store.workdir(key)
    # keys, not URIs: the entry stays valid when the store is copied or moved
    (out / CACHE_ENTRY_NAME).write_text(
        json.dumps(store.as_keys(entry.model_dump(mode="json")), indent=2, sort_keys=True)
    )
    return store.commit(key)
