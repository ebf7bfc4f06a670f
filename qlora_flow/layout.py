"""Where everything lives in the artifact store: every key and file name the stages, flows and `pull` use.

The same keys on every backend (qlora_flow.store for a local directory, qlora_flow.s3store for S3/MinIO):

    cache/data/<fp>/                     validated splits: train.parquet, eval.parquet, quarantine.jsonl, report.json
    cache/data-sources/<hash>.json       source files + reading settings -> data fingerprint (skips the pass)
    cache/base/<source fp>/full/         the base model as 16-bit safetensors, tokenizer, generation config
    cache/base/<source fp>/nf4-<fp>/     its NF4 quantization, with footprint.json
    cache/adapter/<fp>/checkpoints/      training checkpoints (checkpoint-<step>/, each with its own marker)
    cache/adapter/<fp>/adapter/          the trained adapter, its tokenizer and adapter_ref.json
    cache/eval/<fp>/entry.json           measured evaluation numbers (qlora_flow.stage_cache)
    cache/merged/<fp>/entry.json         where the verified merge of an adapter is stored (qlora_flow.stage_cache)
    cache/gguf/<fp>/                     verified GGUF files of a merged model (tasks/export_gguf.py)
    cache/adopted/<kind>/<fp>.json       the earlier fingerprint whose entry answers fp (qlora_flow.code_lineage)
    runs/<run-id>/flow-run.json          the flow run that owns the run id
    runs/<run-id>/eval/                  report.json, report.md, samples.jsonl, loss_curve.png
    runs/<run-id>/model/                 the merged model, verification.json, README.md (model card)
    runs/<run-id>/adapter/, data-report/ copies made by publish
    runs/<run-id>/manifest.json          every published file with size and SHA-256, and the lineage
    runs/<run-id>/same-as.json           an unchanged re-run: the run whose publication the alias keeps serving
    models/<name>/<alias>.json           alias documents (`production`, `latest`), moved last by compare-and-swap
    quarantine/<kind>/<rest>/<time>/     an entry that failed verification (entry/) and its reason.json

A directory counts only once its `_COMPLETE` marker (qlora_flow.store.COMPLETE_MARKER) exists.
Changing a key here moves where results are found: caches written under the old key are not read again.
"""

from __future__ import annotations

MANIFEST_NAME = "manifest.json"
SAME_AS_NAME = "same-as.json"
CLAIM_NAME = "flow-run.json"
ADAPTER_REF_NAME = "adapter_ref.json"
CACHE_ENTRY_NAME = "entry.json"
DATA_REPORT_NAME = "report.json"
QUARANTINE_NAME = "quarantine.jsonl"
EVAL_REPORT_NAME = "report.json"
FOOTPRINT_NAME = "footprint.json"
QUARANTINE_ROOT = "quarantine"
REASON_NAME = "reason.json"

# Cache directories are named by the first 24 hex digits of their fingerprint (96 bits).
_FP_DIGITS = 24


def cache_key(kind: str, fingerprint: str) -> str:
    """cache/<kind>/<fp>: the content-addressed home of one stage result (adapter, eval, merged)."""
    return f"cache/{kind}/{fingerprint[:_FP_DIGITS]}"


def adoption_key(kind: str, fingerprint: str) -> str:
    """cache/adopted/<kind>/<fp>.json: names the entry, stored by earlier code declared equivalent, that answers fp."""
    return f"cache/adopted/{kind}/{fingerprint[:_FP_DIGITS]}.json"


def adapter_key(fingerprint: str) -> str:
    return cache_key("adapter", fingerprint)


def adapter_checkpoints_key(fingerprint: str) -> str:
    return f"{adapter_key(fingerprint)}/checkpoints"


def trained_adapter_key(fingerprint: str) -> str:
    return f"{adapter_key(fingerprint)}/adapter"


def data_key(fingerprint: str) -> str:
    """Validated data keeps its full fingerprint in the key (written so since the first release)."""
    return f"cache/data/{fingerprint}"


def data_source_key(source_hash: str) -> str:
    return f"cache/data-sources/{source_hash}.json"


def base_full_key(source_fingerprint: str) -> str:
    return f"cache/base/{source_fingerprint[:_FP_DIGITS]}/full"


def base_nf4_key(source_fingerprint: str, fingerprint: str) -> str:
    return f"cache/base/{source_fingerprint[:_FP_DIGITS]}/nf4-{fingerprint[:16]}"


def run_key(run_id: str) -> str:
    return f"runs/{run_id}"


def run_manifest_key(run_id: str) -> str:
    return f"{run_key(run_id)}/{MANIFEST_NAME}"


def run_model_key(run_id: str) -> str:
    return f"{run_key(run_id)}/model"


def run_eval_key(run_id: str) -> str:
    return f"{run_key(run_id)}/eval"


def alias_key(model_name: str, alias: str) -> str:
    return f"models/{model_name}/{alias}.json"


def quarantine_key(key: str, stamp: str) -> str:
    """Where a corrupt entry is set aside: cache/adapter/<fp>/... -> quarantine/adapter/<fp>/.../<stamp>."""
    return f"{QUARANTINE_ROOT}/{key.strip('/').removeprefix('cache/')}/{stamp}"
