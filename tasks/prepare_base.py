"""Stage 2: resolve the base model, keep its 16-bit weights, and store its NF4 quantization once.

Both checkpoints live under `cache/base/<source fingerprint>/`, so every later run with the same
base and quantization settings loads them directly instead of converting or quantizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from qlora_flow.config import PipelineConfig
from qlora_flow.errors import is_retryable
from qlora_flow.fingerprint import combine
from qlora_flow.hardware import compute_plan
from qlora_flow.layout import base_full_key, base_nf4_key
from qlora_flow.models import (
    end_of_turn_token_ids,
    load_nf4_model,
    load_source_model,
    load_tokenizer_for,
    resolve_source,
    source_fingerprint,
)
from qlora_flow.preflight import check_lora_targets
from qlora_flow.refs import PreparedBase
from qlora_flow.store import ArtifactStore, open_store

log = logging.getLogger(__name__)


def _import_full_precision(cfg: PipelineConfig, store: ArtifactStore, source, key: str) -> None:
    """Write the base as a 16-bit safetensors directory with tokenizer, chat template and generation config."""
    local_dir = None
    if source.kind == "s3":
        local_dir = str(_download_model_prefix(cfg, source.location))
    model = load_source_model(cfg.base_model, source, local_dir)
    if local_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local_dir)
    else:
        tokenizer = load_tokenizer_for(cfg.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Generation must stop at the chat's end-of-turn token, which GGUF imports and many hubs omit.
    stop_ids = end_of_turn_token_ids(tokenizer)
    model.generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    out = store.workdir(key)
    model.save_pretrained(out, max_shard_size=cfg.merge.max_shard_size)
    tokenizer.save_pretrained(out)
    store.commit(key)


def _download_model_prefix(cfg: PipelineConfig, uri: str) -> Path:
    """Copy a Hugging Face model directory kept under an s3:// prefix into the local cache.

    A user's model prefix carries no `_COMPLETE` marker (it was not written by this pipeline), so it
    is listed and downloaded object by object rather than fetched as a store result.
    """
    from qlora_flow.s3store import S3Store

    remote = S3Store.from_config(uri, cfg.execution.s3, cache_dir=cfg.execution.local_cache)
    keys = remote.list("")
    if "config.json" not in keys:
        raise FileNotFoundError(f"base_model.id: {uri} holds no config.json; not a model directory")
    dest = Path(cfg.execution.local_cache) / "base-sources" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    for key in keys:
        remote.download(key, dest / key)
    return dest


def prepare_base_model(cfg: PipelineConfig, store: ArtifactStore) -> PreparedBase:
    started = time.perf_counter()
    source = resolve_source(cfg.base_model)
    source_fp = source_fingerprint(cfg.base_model, source)
    plan = compute_plan(cfg.execution.device, cfg.quantization.compute_dtype)

    full_key = base_full_key(source_fp)
    # Base weights are re-hashed only where a file's size or mtime changed since it last verified: hashing
    # every read would add ~4 s (8B NF4) + ~11 s (16-bit) to every run at 1.4 GB/s (README: self-healing caches).
    full_dir = store.verified(full_key, always_hash=False)
    if full_dir is None:
        log.info("importing base model %s into 16-bit safetensors", cfg.base_model.id)
        _import_full_precision(cfg, store, source, full_key)
        full_dir = store.fetch(full_key)
    # before quantizing and training: peft would only stop the training child, with a traceback
    check_lora_targets(cfg.lora, full_dir, cfg.base_model.id)

    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(full_dir)
    fingerprint = combine(source_fp, cfg.quantization, plan.dtype_name)
    footprint_16 = sum(p.stat().st_size for p in full_dir.glob("*.safetensors"))
    parameters = _parameter_count(full_dir)

    nf4_uri = None
    footprint_nf4 = None
    if cfg.quantization.load_in_4bit:
        nf4_key = base_nf4_key(source_fp, fingerprint)
        if store.verified(nf4_key, always_hash=False) is None:
            log.info(
                "quantizing base model to %s (double quant %s)",
                cfg.quantization.quant_type,
                cfg.quantization.double_quant,
            )
            model = load_nf4_model(full_dir, plan.compute_dtype, plan.device, cfg.quantization)
            out = store.workdir(nf4_key)
            model.save_pretrained(out)
            (out / "footprint.json").write_text(json.dumps({"bytes": model.get_memory_footprint()}))
            del model
            if plan.device == "cuda":
                torch.cuda.empty_cache()
            store.commit(nf4_key)
        nf4_dir = store.fetch(nf4_key)
        footprint_nf4 = json.loads((nf4_dir / "footprint.json").read_text())["bytes"]
        nf4_uri = store.uri(nf4_key)

    return PreparedBase(
        model_id=cfg.base_model.id,
        full_precision_uri=store.uri(full_key),
        nf4_uri=nf4_uri,
        fingerprint=fingerprint,
        compute_dtype=plan.dtype_name,
        device=plan.device,
        parameters=parameters,
        footprint_bytes_16bit=footprint_16,
        footprint_bytes_nf4=footprint_nf4,
        load_seconds=round(time.perf_counter() - started, 3),
        architecture=(model_config.architectures or [model_config.model_type])[0],
    )


def _parameter_count(model_dir) -> int:
    from safetensors import safe_open

    total = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as fh:
            for name in fh.keys():
                total += math.prod(fh.get_slice(name).get_shape())
    return total


# No Prefect cache: the stage is content-addressed itself (a changed model file must never hit a config-keyed
# cache), and finding both checkpoints already stored costs one hash of the source.
@task(
    name="prepare_base_model", retries=1, retry_delay_seconds=10, retry_condition_fn=is_retryable, cache_policy=NO_CACHE
)
def prepare_base_model_task(cfg: PipelineConfig) -> PreparedBase:
    return prepare_base_model(cfg, open_store(cfg.execution))
