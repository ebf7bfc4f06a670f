"""The Prefect event resource of a model: one per (store, model name), so that `model.published` and
`model.rejected` of a same-named model in another store are different resources, labelled with the
alias a run moves when it publishes (automations react only to runs that would move that alias)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from qlora_flow.config import ExecutionConfig, PipelineConfig

RESOURCE_PREFIX = "qlora-flow.model."
ALIAS_LABEL = "qlora-flow.alias"  # absent when the run does not publish
STORE_LABEL = "qlora-flow.store"


def store_identity(execution: ExecutionConfig, workdir: Path | None = None) -> tuple[str, str]:
    """(id, uri) of the store a config writes to: a 12-hex id stable across runs, and the store's URI.
    A relative local store resolves from workdir (default: the current directory, like the stages)."""
    if execution.store.startswith("s3://"):
        uri = execution.store.rstrip("/")
        # the same bucket name on MinIO and on AWS are different stores
        identity = f"{uri} at {execution.s3.endpoint_url}" if execution.s3.endpoint_url else uri
    else:
        uri = identity = (workdir or Path.cwd()).joinpath(execution.store).resolve().as_uri()
    return hashlib.sha256(identity.encode()).hexdigest()[:12], uri


def model_resource_id(model_name: str, store_id: str) -> str:
    return f"{RESOURCE_PREFIX}{store_id}.{model_name}"


def model_resource(cfg: PipelineConfig, workdir: Path | None = None) -> dict[str, str]:
    store_id, store_uri = store_identity(cfg.execution, workdir)
    resource = {
        "prefect.resource.id": model_resource_id(cfg.publish.model_name, store_id),
        "prefect.resource.name": cfg.publish.model_name,
        STORE_LABEL: store_uri,
    }
    if cfg.publish.enabled:
        resource[ALIAS_LABEL] = cfg.publish.alias
    return resource
