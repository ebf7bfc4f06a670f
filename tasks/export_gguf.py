"""Export stage: the verified merged model as GGUF files, each read back and checked before it is committed.

Runs after the merge (whose saved directory it reads) and before publish, only when `export.gguf`
names types. Files land in cache/gguf/<fingerprint>/ (`model-f16.gguf`, `model-q8_0.gguf`,
`verification.json`; the fingerprint covers the merged model, the export and check settings and this
code, so an unchanged re-run reuses them), committed only after every file passed its check, so publish
(which copies them to runs/<run-id>/gguf/) never lists a file that failed. The check mirrors the merge verification: transformers' GGUF loader reads the file
back (de-quantized to float32), and on the first `merge.verify_prompts` eval prompts its greedy
answers and logits are compared with the merged model's (both in float32, on the same token ids):
  - f16: every greedy answer token for token;
  - q8_0: top-1 agreement over every position >= export.q8_0_min_top1_agreement (the numbers are kept);
  - both: the tokenizer read back from the file encodes the prompts to the same ids and carries the
    same chat template.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil

from prefect import task

from qlora_flow.code_lineage import code_hashes, find_result
from qlora_flow.config import PipelineConfig
from qlora_flow.fingerprint import combine
from qlora_flow.gguf_export import (
    check_exportable,
    compare_models,
    export_gguf,
    gguf_file_name,
    load_gguf,
)
from qlora_flow.layout import cache_key
from qlora_flow.refs import GgufExport, MergedModel, ValidatedDataset
from qlora_flow.store import ArtifactStore, open_store

log = logging.getLogger(__name__)


class GgufVerificationError(RuntimeError):
    """A GGUF file does not reproduce the merged model; the numbers say how."""


def _verify_prompts(cfg: PipelineConfig, store: ArtifactStore, data: ValidatedDataset) -> list[list[dict]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(store.fetch_file(data.eval_uri)).column("messages").to_pylist()
    return [messages[:-1] for messages in rows[: cfg.merge.verify_prompts]]


def gguf_fingerprints(cfg: PipelineConfig, merged: MergedModel, data: ValidatedDataset) -> list[str]:
    """The merged model, the eval prompts, the export and check settings and the code; today's first, then
    earlier code's (qlora_flow.code_lineage)."""
    return [
        combine(
            "gguf",
            merged.fingerprint,
            data.fingerprint,
            cfg.export,
            cfg.merge.verify_prompts,
            cfg.merge.logits_atol_16bit,
            cfg.evaluation.max_new_tokens,
            cfg.publish.model_name,
            code,
        )
        for code in code_hashes("gguf")
    ]


def export_gguf_files(
    cfg: PipelineConfig, store: ArtifactStore, merged: MergedModel, data: ValidatedDataset
) -> GgufExport:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_flow.models import end_of_turn_token_ids

    def complete(fingerprint: str) -> str | None:
        key = cache_key("gguf", fingerprint)
        return key if store.is_complete(key) else None

    fingerprints = gguf_fingerprints(cfg, merged, data)
    found = find_result(store, "gguf", fingerprints, complete)
    key = found[1] if found else cache_key("gguf", fingerprints[0])
    if found:
        log.info(
            "GGUF files for merged model %s already exported and verified: %s", merged.fingerprint[:16], store.uri(key)
        )
        files = {q: gguf_file_name(q) for q in cfg.export.gguf}
        return GgufExport(uri=store.uri(key), files=files, verification=store.read_json(f"{key}/verification.json"))
    model_dir = store.fetch(store.key_of(merged.uri))
    check_exportable(model_dir)  # an unsupported model fails here, before anything is written
    out = store.workdir(key)
    for stale in out.iterdir():  # a killed attempt may have left files behind
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = _verify_prompts(cfg, store, data)
    stop_ids = end_of_turn_token_ids(tokenizer)
    rendered = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    files, verification, failures = {}, {}, []
    for qtype in cfg.export.gguf:
        name = gguf_file_name(qtype)
        export_gguf(model_dir, out / name, qtype, cfg.publish.model_name)
        model, file_tokenizer = load_gguf(out, name)
        result = compare_models(
            reference,
            model,
            tokenizer,
            prompts,
            cfg.evaluation.max_new_tokens,
            stop_ids,
            2 * cfg.merge.logits_atol_16bit,
        )
        del model
        gc.collect()
        same_ids = all(
            file_tokenizer(t, add_special_tokens=False)["input_ids"]
            == tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in rendered
        )
        result |= {
            "tokenizer_same_ids": same_ids,
            "same_chat_template": file_tokenizer.chat_template == tokenizer.chat_template,
            "bytes": (out / name).stat().st_size,
        }
        verification[qtype], files[qtype] = result, name
        log.info("GGUF %s: %s", name, json.dumps(result, sort_keys=True))
        if qtype == "f16" and result["greedy_identical"] != result["prompts"]:
            failures.append(
                f"{name}: {result['prompts'] - result['greedy_identical']} of {result['prompts']} greedy answers differ from the merged model's"
            )
        if qtype == "q8_0" and result["top1_agreement"] < cfg.export.q8_0_min_top1_agreement:
            failures.append(
                f"{name}: top-1 agreement {result['top1_agreement']:.4f} < export.q8_0_min_top1_agreement {cfg.export.q8_0_min_top1_agreement}"
            )
        if not (same_ids and result["same_chat_template"]):
            failures.append(
                f"{name}: the tokenizer read back from the file differs (same ids: {same_ids}, same chat template: {result['same_chat_template']})"
            )
    if failures:
        raise GgufVerificationError(f"GGUF export at {store.uri(key)} failed verification: " + "; ".join(failures))
    (out / "verification.json").write_text(json.dumps(verification, indent=2, sort_keys=True))
    return GgufExport(uri=store.commit(key), files=files, verification=verification)


# No retries: an unsupported model or a failed verification would only fail again.
@task(name="export-gguf")
def export_gguf_task(cfg: PipelineConfig, merged: MergedModel, data: ValidatedDataset) -> GgufExport:
    return export_gguf_files(cfg, open_store(cfg.execution), merged, data)
