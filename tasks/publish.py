"""Publish stage: put one run's model, adapter, reports and a manifest in the store, then move the alias.

Order is what makes a crash at any point safe for consumers:
  1. copy the adapter, eval and data reports into runs/<run-id>/ (the merged model is there already, or,
     reused from the earlier run that merged it, stays there: its manifest entries name it in `stored_at`),
     verifying each object's size and SHA-256;
  2. write runs/<run-id>/manifest.json, listing every file with size and SHA-256 plus the lineage;
  3. only then, and only when the quality gate passed, move models/<name>/<alias>.json and
     models/<name>/latest.json by compare-and-swap.
A consumer following an alias therefore always finds a manifest whose files all exist and verify.

A repeat (the alias already serves a publication with the same fingerprint: model, adapter, data, base,
recipe, measured numbers, publish settings) copies and moves nothing: runs/<run-id>/same-as.json records
which run's manifest the alias keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime, timezone
from pathlib import PurePosixPath

import yaml
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.transactions import transaction

from qlora_flow.artifacts import publish_model_link
from qlora_flow.config import PipelineConfig
from qlora_flow.errors import is_retryable
from qlora_flow.fingerprint import code_version, combine, library_versions
from qlora_flow.layout import MANIFEST_NAME, SAME_AS_NAME, alias_key, run_key
from qlora_flow.model_events import model_resource
from qlora_flow.pull import stored_key
from qlora_flow.refs import (
    AdapterRef,
    EvalReport,
    GgufExport,
    MergedModel,
    PreparedBase,
    PublishedModel,
    ValidatedDataset,
)
from qlora_flow.stage_cache import recipe_fingerprint
from qlora_flow.store import COMPLETE_MARKER, AliasConflict, ArtifactStore

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = 1
# fields that legitimately differ when the same run is published again
_VOLATILE_MANIFEST_FIELDS = ("created_at", "flow_run_id")
_SECRET_FIELD = re.compile(r"(^|_)(secret|password|token|access_key)(_|$)", re.IGNORECASE)  # not max_new_tokens
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_LATEST_ATTEMPTS = 5


class PublishError(RuntimeError):
    """The run cannot be published as asked."""


def redact(value):
    """Config as JSON with anything credential-like removed (URL user-info, secret-named fields)."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_FIELD.search(k) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub("", value)
    return value


def _tree(store: ArtifactStore, uri: str) -> str:
    """The directory key a reference points into (its parent when it names a single file)."""
    key = store.key_of(uri)
    return str(PurePosixPath(key).parent) if store.list(key) == [key] else key


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + "/")


def _plan(
    store: ArtifactStore,
    merged: MergedModel,
    adapter: AdapterRef,
    report: EvalReport,
    data: ValidatedDataset,
    gguf: GgufExport | None = None,
) -> dict[str, str]:
    """Destination path (relative to the run) -> source key, for every file the run publishes."""
    model = store.key_of(merged.uri)
    if not store.is_complete(model):
        raise PublishError(f"merged model {merged.uri} is missing or was never completed")
    plan: dict[str, str] = {}

    def add_tree(src: str, part: str, skip: str | None = None) -> None:
        keys = [
            k for k in store.list(src) if PurePosixPath(k).name != COMPLETE_MARKER and not (skip and _under(k, skip))
        ]
        if not keys:
            raise PublishError(f"nothing stored under {store.uri(src)} for {part}/")
        for k in keys:
            plan[f"{part}/{k[len(src) + 1 :]}"] = k

    def add_file(uri: str | None, part: str) -> None:
        if uri and not any(v == store.key_of(uri) for v in plan.values()):
            key = store.key_of(uri)
            plan[f"{part}/{PurePosixPath(key).name}"] = key

    add_tree(model, "model")
    if gguf is not None:
        if not store.is_complete(store.key_of(gguf.uri)):
            raise PublishError(f"GGUF export {gguf.uri} is missing or was never completed")
        add_tree(store.key_of(gguf.uri), "gguf")
    add_tree(_tree(store, adapter.uri), "adapter", skip=store.key_of(adapter.checkpoint_uri))
    add_tree(_tree(store, report.uri), "eval")
    add_file(report.samples_uri, "eval")
    add_file(report.loss_plot_uri, "eval")
    add_file(data.report_uri, "data-report")
    if data.quarantine_uri and store.exists(store.key_of(data.quarantine_uri)):
        add_file(data.quarantine_uri, "data-report")
    return plan


def adapter_card(
    cfg: PipelineConfig, store: ArtifactStore, run_id: str, adapter: AdapterRef, base: PreparedBase
) -> str:
    """README of the published adapter: which base it belongs on, and how to load or serve it."""
    lora = json.loads(store.read_bytes(f"{store.key_of(adapter.uri)}/adapter_config.json"))
    metadata = {
        "base_model": base.model_id,
        "library_name": "peft",
        "tags": ["lora", "qlora", "qlora-flow"],
        "qlora_flow": {
            "run_id": run_id,
            "base_model_source": base.model_id,
            "base_fingerprint": base.fingerprint,
            "adapter_fingerprint": adapter.fingerprint,
            "lora": {
                k: lora.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora")
            },
        },
    }
    body = (
        f"# {cfg.publish.model_name} LoRA adapter (run `{run_id}`)\n\n"
        f"Trained with QLoRA on the NF4-quantized `{base.model_id}`; apply it to that model's 16-bit weights "
        f"(base fingerprint `{base.fingerprint}`), which is what `model/` of this run is merged from.\n\n"
        "- peft: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER_DIR)`\n"
        "- vLLM: `vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER_DIR`\n"
        "- TGI: `--lora-adapters NAME=ADAPTER_DIR`\n"
    )
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + body


def publication_fingerprint(
    cfg: PipelineConfig,
    *,
    merged: MergedModel,
    adapter: AdapterRef,
    report: EvalReport,
    data: ValidatedDataset,
    base: PreparedBase,
    gguf: GgufExport | None = None,
) -> str | None:
    """What a publication's content follows from: model, adapter, data, base, recipe, measured numbers and
    publish settings. None when the evaluation carries no fingerprint: such a run is never taken as a repeat."""
    if report.fingerprint is None:
        return None
    return combine(
        "publication",
        merged.fingerprint,
        adapter.fingerprint,
        data.fingerprint,
        base.fingerprint,
        recipe_fingerprint(cfg),
        report.fingerprint,
        cfg.publish,
        *([{"gguf": sorted(gguf.files)}] if gguf else []),  # GGUF files turned on make a new publication
    )


def build_manifest(
    cfg: PipelineConfig,
    run_id: str,
    files: dict[str, tuple[int, str]],
    *,
    merged: MergedModel,
    adapter: AdapterRef,
    report: EvalReport,
    data: ValidatedDataset,
    base: PreparedBase,
    flow_run_id: str | None,
    stored_at: dict[str, str] | None = None,
    gguf: GgufExport | None = None,
) -> dict:
    return {
        "schema": MANIFEST_SCHEMA,
        "run_id": run_id,
        "model_name": cfg.publish.model_name,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "flow_run_id": flow_run_id,
        "files": [
            {"path": p, "size": size, "sha256": sha} | ({"stored_at": stored_at[p]} if p in (stored_at or {}) else {})
            for p, (size, sha) in sorted(files.items())
        ],
        "total_bytes": sum(size for size, _ in files.values()),
        "metrics": {
            "base": report.base_metrics,
            "tuned": report.tuned_metrics,
            "production": report.production_metrics,
        },
        "gate": report.verdict.model_dump(mode="json"),
        "lineage": {
            "data": {
                "fingerprint": data.fingerprint,
                "source_format": data.source_format,
                "n_input_rows": data.n_input_rows,
                "n_train": data.n_train,
                "n_eval": data.n_eval,
                "n_rejected": data.n_rejected,
            },
            "base_model": {"id": base.model_id, "fingerprint": base.fingerprint, "compute_dtype": base.compute_dtype},
            "adapter": {"fingerprint": adapter.fingerprint, "steps": adapter.steps, "tokens_seen": adapter.tokens_seen},
            "recipe": {"fingerprint": recipe_fingerprint(cfg)},
            "merged": {"fingerprint": merged.fingerprint, "dtype": merged.dtype, "verification": merged.verification},
            "evaluation": {"fingerprint": report.fingerprint},
            "publication": {
                "fingerprint": publication_fingerprint(
                    cfg, merged=merged, adapter=adapter, report=report, data=data, base=base, gguf=gguf
                )
            },
            "config": redact(cfg.model_dump(mode="json")),
            "library_versions": library_versions(),
            "code_version": code_version(),
        },
    }


def _info_or_none(store: ArtifactStore, key: str) -> tuple[int, str] | None:
    try:
        return store.file_info(key)
    except FileNotFoundError:
        return None


def _same_content(a: dict, b: dict) -> bool:
    def strip(doc: dict) -> dict:
        return {k: v for k, v in doc.items() if k not in _VOLATILE_MANIFEST_FIELDS}

    return strip(a) == strip(b)


def _move_alias(store: ArtifactStore, key: str, document: dict, *, keep_newer: bool) -> bool:
    """Compare-and-swap the alias to document. True when it points at this run afterwards.

    A named alias (production) is tried once against the version just read: when another
    publisher wins that race, its choice stands. `latest` retries, but never replaces a
    document published later than ours.
    """
    for _ in range(_LATEST_ATTEMPTS if keep_newer else 1):
        current, version = store.read_alias(key)
        if current and current.get("run_id") == document["run_id"]:
            return True
        if keep_newer and current and current.get("published_at", "") > document["published_at"]:
            return False
        try:
            store.swap_alias(key, document, version)
            return True
        except AliasConflict as exc:
            log.warning("%s", exc)
    return False


def _served_publication(store: ArtifactStore, cfg: PipelineConfig, fingerprint: str | None) -> tuple[dict, dict] | None:
    """(alias document, manifest) when the alias already serves an intact publication with this fingerprint."""
    if fingerprint is None:
        return None
    key = alias_key(cfg.publish.model_name, cfg.publish.alias)
    document, _ = store.read_alias(key)
    if document is None:
        return None
    try:
        manifest_key = document.get("manifest_key") or store.key_of(document["manifest_uri"])
        manifest_bytes = store.read_bytes(manifest_key)
        manifest = json.loads(manifest_bytes)
        served = manifest["lineage"].get("publication", {}).get("fingerprint")
    except (KeyError, FileNotFoundError, ValueError) as exc:  # a damaged alias is replaced by this publication
        log.warning("%s names no readable manifest (%s); publishing this run in full", store.uri(key), exc)
        return None
    if served != fingerprint:
        return None
    run = manifest_key.rsplit("/", 1)[0]
    stored = set(store.list(run))
    missing = [
        f["path"]
        for f in manifest["files"]
        if stored_key(run, f) not in stored and not store.exists(stored_key(run, f))
    ]
    if hashlib.sha256(manifest_bytes).hexdigest() != document["manifest_sha256"] or missing:
        log.warning(
            "%s serves this publication but its manifest or files (%s) are damaged; publishing it again",
            store.uri(manifest_key),
            ", ".join(missing[:3]) or "manifest checksum",
        )
        return None
    return document, manifest


def _relocate_alias(store: ArtifactStore, key: str, manifest_uri: str, model_uri: str) -> None:
    """After a copy or move of the store, point the alias document's URIs (what people and serving tools read)
    at this store; its keys were right all along. Compare-and-swap: a publisher that moved it meanwhile wins."""
    document, version = store.read_alias(key)
    if document is None or (document.get("manifest_uri"), document.get("model_uri")) == (manifest_uri, model_uri):
        return
    try:
        store.swap_alias(key, {**document, "manifest_uri": manifest_uri, "model_uri": model_uri}, version)
    except AliasConflict:
        return
    log.info(
        "%s named the store's earlier place (%s); its URIs now name this store",
        store.uri(key),
        document.get("manifest_uri"),
    )


def _record_same_as(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run_id: str,
    served: tuple[dict, dict],
    fingerprint: str,
    flow_run_id: str | None,
) -> PublishedModel:
    run = run_key(run_id)
    # An unchanged re-run: the alias already serves this model with these numbers. Nothing is copied and
    # the alias stays; the run's record names the run whose manifest (and model files) it would have duplicated.
    document, manifest = served
    # URIs in this store: the alias document's absolute ones name where the store was when it was written,
    # which after a copy or a move is somewhere else
    manifest_uri = store.uri(document.get("manifest_key") or store.key_of(document["manifest_uri"]))
    model_uri = store.uri(store.key_of(document["model_uri"]))
    _relocate_alias(store, alias_key(cfg.publish.model_name, cfg.publish.alias), manifest_uri, model_uri)
    store.write_json(
        f"{run}/{SAME_AS_NAME}",
        store.as_keys(
            {
                "run_id": run_id,
                "same_as_run": document["run_id"],
                "model_name": cfg.publish.model_name,
                "alias": cfg.publish.alias,
                "manifest_uri": manifest_uri,
                "manifest_sha256": document["manifest_sha256"],
                "model_uri": model_uri,
                "publication_fingerprint": fingerprint,
                "created_at": datetime.now(timezone.utc).isoformat(),
                "flow_run_id": flow_run_id,
            }
        ),
    )
    log.info(
        "%s:%s already serves this publication (run %s); nothing copied",
        cfg.publish.model_name,
        cfg.publish.alias,
        document["run_id"],
    )
    return PublishedModel(
        run_uri=store.uri(run),
        manifest_uri=manifest_uri,
        model_uri=model_uri,
        alias_uri=store.uri(alias_key(cfg.publish.model_name, cfg.publish.alias)),
        alias_moved=False,
        files=len(manifest["files"]),
        total_bytes=manifest["total_bytes"],
        same_as_run=document["run_id"],
    )


def _write_run_files(
    store: ArtifactStore, run: str, plan: dict[str, str], sources: dict, stored_at: dict[str, str]
) -> None:
    """Copy the run's files into runs/<id>/ (checked after copying) and mark each part complete."""
    for dst, src in plan.items():
        target = f"{run}/{dst}"
        if src == target or dst in stored_at:  # the merged model, verified when the merge stage committed it
            continue
        if _info_or_none(store, target) != sources[dst]:  # skips copies a crashed attempt finished
            store.copy(src, target)
            if _info_or_none(store, target) != sources[dst]:
                raise PublishError(f"{store.uri(target)} does not match its source {store.uri(src)} after copying")
    for part in sorted({dst.split("/", 1)[0] for dst in plan} - {"model"}):
        listing = {
            dst.split("/", 1)[1]: {"size": size, "sha256": sha}
            for dst, (size, sha) in sources.items()
            if dst.startswith(part + "/")
        }
        store.write_json(f"{run}/{part}/{COMPLETE_MARKER}", {"files": listing})


def publish_run(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run_id: str,
    *,
    merged: MergedModel,
    adapter: AdapterRef,
    report: EvalReport,
    data: ValidatedDataset,
    base: PreparedBase,
    flow_run_id: str | None = None,
    gguf: GgufExport | None = None,
) -> PublishedModel:
    run = run_key(run_id)
    manifest_key = f"{run}/{MANIFEST_NAME}"
    fingerprint = publication_fingerprint(
        cfg, merged=merged, adapter=adapter, report=report, data=data, base=base, gguf=gguf
    )
    served = _served_publication(store, cfg, fingerprint) if report.verdict.passed else None
    if served is not None and served[0]["run_id"] != run_id and not store.exists(manifest_key):
        return _record_same_as(cfg, store, run_id, served, fingerprint, flow_run_id)

    plan = _plan(store, merged, adapter, report, data, gguf)
    # the adapter is served as it is (vLLM/TGI LoRA modules): its README names the base it belongs on
    card, card_key = adapter_card(cfg, store, run_id, adapter, base).encode(), f"{run}/adapter/README.md"
    if _info_or_none(store, card_key) != (
        len(card),
        hashlib.sha256(card).hexdigest(),
    ):  # publishing again writes nothing
        store.write_bytes(card_key, card)
    plan["adapter/README.md"] = card_key
    sources = {dst: store.file_info(src) for dst, src in plan.items()}
    # a merged model reused from an earlier run (qlora_flow.stage_cache) stays where it is; the manifest says where
    stored_at = {dst: src for dst, src in plan.items() if dst.startswith("model/") and src != f"{run}/{dst}"}
    manifest = build_manifest(
        cfg,
        run_id,
        sources,
        merged=merged,
        adapter=adapter,
        report=report,
        data=data,
        base=base,
        flow_run_id=flow_run_id,
        stored_at=stored_at,
        gguf=gguf,
    )

    if store.exists(manifest_key):
        existing = store.read_json(manifest_key)
        if not _same_content(existing, manifest):
            raise PublishError(
                f"{store.uri(manifest_key)} already describes different files or lineage; "
                f"publish the changed run under a new run id"
            )
        manifest = existing
        log.info("run %s is already published; only checking the aliases", run_id)
    else:
        _write_run_files(store, run, plan, sources, stored_at)
        store.write_json(manifest_key, manifest)

    model_uri = merged.uri
    manifest_bytes = store.read_bytes(manifest_key)
    alias_uri = None
    if report.verdict.passed:
        name, alias = cfg.publish.model_name, cfg.publish.alias
        document = {
            "run_id": run_id,
            "model_name": name,
            "manifest_key": manifest_key,  # what readers follow; the URIs are for people and stay as written
            "manifest_uri": store.uri(manifest_key),
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "model_uri": model_uri,
            "published_at": datetime.now(timezone.utc).isoformat(),
            "metrics": report.tuned_metrics,
        }
        if _move_alias(store, alias_key(name, alias), {**document, "alias": alias}, keep_newer=False):
            alias_uri = store.uri(alias_key(name, alias))
        if alias != "latest":
            _move_alias(store, alias_key(name, "latest"), {**document, "alias": "latest"}, keep_newer=True)
    else:
        log.warning("run %s failed the quality gate; published without moving %s", run_id, cfg.publish.alias)

    return PublishedModel(
        run_uri=store.uri(run),
        manifest_uri=store.uri(manifest_key),
        model_uri=model_uri,
        alias_uri=alias_uri,
        alias_moved=alias_uri is not None,
        files=len(manifest["files"]),
        total_bytes=manifest["total_bytes"],
    )


def _announce(
    cfg: PipelineConfig, store: ArtifactStore, run_id: str, published: PublishedModel, report: EvalReport
) -> None:
    name = cfg.publish.model_name
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    publish_model_link(cfg, store, run_id, published)
    alias_line = (
        f"`{cfg.publish.alias}` now points to this run" if published.alias_moved else f"`{cfg.publish.alias}` not moved"
    )
    metrics = "\n".join(
        f"| {k} | {report.base_metrics.get(k, float('nan')):.4g} | {v:.4g} |" for k, v in report.tuned_metrics.items()
    )
    create_markdown_artifact(
        key=f"published-{slug}",
        markdown=(
            f"## {name}: run `{run_id}`\n\n- model: `{published.model_uri}`\n- manifest: `{published.manifest_uri}`\n"
            f"- {published.files} files, {published.total_bytes} bytes\n- {alias_line}\n\n"
            f"| metric | base | tuned |\n|---|---|---|\n{metrics}\n"
        ),
        description=f"Publication of {name} run {run_id}",
    )
    emit_event(
        event="model.published",
        resource=model_resource(cfg),
        related=[{"prefect.resource.id": f"qlora-flow.run.{run_id}", "prefect.resource.role": "run"}],
        payload={
            "model": name,
            "run_id": run_id,
            "alias": cfg.publish.alias,
            "alias_moved": published.alias_moved,
            "model_uri": published.model_uri,
            "manifest_uri": published.manifest_uri,
            "metrics": report.tuned_metrics,
            "gate_passed": report.verdict.passed,
        },
    )


@task(name="publish", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=is_retryable, cache_policy=NO_CACHE)
def publish_task(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run_id: str,
    *,
    merged: MergedModel,
    adapter: AdapterRef,
    report: EvalReport,
    data: ValidatedDataset,
    base: PreparedBase,
    gguf: GgufExport | None = None,
) -> PublishedModel:
    logger = get_run_logger()
    # keyed on store + run: a second publish of the same run returns the recorded result untouched,
    # unless the manifest has vanished from the store since (then the record is stale and is replaced)
    key = (
        "publish-" + hashlib.sha256(f"{store.uri(run_key(run_id))}|{cfg.publish.model_name}".encode()).hexdigest()[:32]
    )
    in_store = store.exists(f"{run_key(run_id)}/{MANIFEST_NAME}")
    with transaction(key=key, write_on_commit=True, overwrite=not in_store) as txn:
        if txn.is_committed():
            record = txn.read()
            if record is not None:
                logger.info("run %s was already published (transaction %s)", run_id, key)
                return record.result
        published = publish_run(
            cfg,
            store,
            run_id,
            merged=merged,
            adapter=adapter,
            report=report,
            data=data,
            base=base,
            flow_run_id=flow_run.get_id(),
            gguf=gguf,
        )
        txn.stage(published)
    if published.same_as_run:
        # nothing new was published: no model.published event for automations to act on
        logger.info(
            "%s:%s already serves this model (run %s); recorded %s/%s",
            cfg.publish.model_name,
            cfg.publish.alias,
            published.same_as_run,
            published.run_uri,
            SAME_AS_NAME,
        )
        return published
    logger.info(
        "published %s: %d files, alias moved: %s", published.manifest_uri, published.files, published.alias_moved
    )
    _announce(cfg, store, run_id, published, report)
    return published
