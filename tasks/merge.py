"""Merge the adapter into the 16-bit base, save a standalone model, and prove it behaves like the adapter.

Never merged into NF4: rounding the merged weights to 4 bits throws the LoRA update away (peft #2105,
#2321). The base is reloaded at its stored 16-bit dtype, the adapter applied with PeftModel and folded
in with `merge_and_unload()`, whose return value is the merged model.

Memory: transformers 5 builds the model on the meta device and fills it shard by shard, and PEFT adds
the float32 LoRA delta in place, one layer at a time, so the merge itself needs about the base's
16-bit size. Verification loads one model at a time (reference, then the saved merge) in
`merge.verify_dtype`: float32 when a float32 copy fits in free memory (auto), else the saved dtype, so
the stage never needs more than the 16-bit size plus a margin (CPU RSS measured at 1.34x for a 1B model
verified in bf16; see README). On a GPU (base.device == "cuda") the weights load straight into GPU
memory and CPU RAM holds about one shard (1.18x for the Llama-3-8B shape on an H200 host).

Verification, on the first `merge.verify_prompts` eval prompts, against the reference
"adapter on the 16-bit base, unmerged":
  - logits of the merged model as saved (reloaded with plain AutoModelForCausalLM) on the reference's
    prompt + greedy answer: max |diff| <= atol, top-1 agreement >= merge.min_top1_agreement. atol is
    merge.logits_atol when both the save and the computation are float32, else merge.logits_atol_16bit:
    rounding W + BA to bf16 is itself a logit change (0.36 max on SmolLM2-135M with its 30 layers, 0.003
    on the 2-layer test model, 0.23 on a random Llama-3-8B shape), not a merge error;
  - greedy answers token for token. A divergence is accepted only at a near tie, where the reference's
    two candidate logits are within 2 * atol (the merged model may legitimately flip there);
  - the reloaded model, generating with its saved generation config, stops at the end-of-turn token;
  - the training-time assistant mask contains the end-of-turn token, so the model was taught to stop.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from prefect import task
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from qlora_flow.config import PipelineConfig
from qlora_flow.console import StageProgress, run_logger
from qlora_flow.fingerprint import combine, library_versions
from qlora_flow.layout import run_model_key
from qlora_flow.models import end_of_turn_token_ids, load_target
from qlora_flow.refs import AdapterRef, EvalReport, MergedModel, PreparedBase, ValidatedDataset
from qlora_flow.stage_cache import MergeEntry, entry_key, find_entry, merge_fingerprints, write_entry
from qlora_flow.stage_inputs import Conversation, local_path, read_conversations, run_tokenizer
from qlora_flow.store import ArtifactStore, open_store
from qlora_flow.training_template import end_of_turn_in_training_mask

log = logging.getLogger(__name__)


class MergeVerificationError(RuntimeError):
    """The merged model does not reproduce the adapter's behaviour; the numbers say how."""


def resolve_save_dtype(requested: str, base_dir: Path) -> torch.dtype:
    """`auto` keeps the dtype the base is stored in (bfloat16 for most current models)."""
    if requested != "auto":
        return getattr(torch, requested)
    config = json.loads((base_dir / "config.json").read_text())
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16")


def model_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def free_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def resolve_verify_dtype(requested: str, saved: torch.dtype, base_dir: Path, device: str) -> torch.dtype:
    """float32 when asked, or (auto) when a float32 copy of the model fits in free memory with 25% to spare.

    On the CPU the 16-bit shards being read count too: loading them as float32 held both (measured
    3.4x the 16-bit size in RSS for a 1B model, against 1.3x when verifying in the saved dtype).
    """
    if requested == "float32" or saved == torch.float32:
        return torch.float32
    if requested == "saved":
        return saved
    size = model_bytes(base_dir)
    needed = size * 4 // saved.itemsize + (size if device == "cpu" else 0)
    return torch.float32 if needed * 1.25 <= free_memory_bytes(device) else saved


def _load(path: Path, dtype: torch.dtype, device: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": load_target(device)})
    return model.eval()


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- behaviour probes


@dataclass
class Probe:
    prompt: list[int]
    generated: list[int]  # greedy answer, as generated (not cut)
    logits: torch.Tensor  # float32 [len(prompt + reference answer), vocab], on the CPU


@torch.no_grad()
def probe(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Conversation],
    max_new_tokens: int,
    eos: list[int] | None,
    reference: list[Probe] | None = None,
    progress: StageProgress | None = None,
) -> list[Probe]:
    """Greedy answers (one prompt at a time, so no padding) and logits on prompt + the reference's answer.

    eos=None generates with the model's own generation config, which is what we check for the saved model.
    """
    device = next(model.parameters()).device
    probes = []
    for i, messages in enumerate(prompts):
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompt = rendered["input_ids"]
        ids = torch.tensor([prompt], device=device)
        kwargs = {"eos_token_id": eos} if eos is not None else {}
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        generated = out[0, len(prompt) :].tolist()
        answer = reference[i].generated if reference else generated
        logits = model(input_ids=torch.tensor([prompt + answer], device=device)).logits[0].float().cpu()
        probes.append(Probe(prompt, generated, logits))
        if progress:
            progress.advance()
    return probes


def compare(reference: list[Probe], candidate: list[Probe], atol: float) -> dict[str, float | int]:
    """Logit and greedy agreement of candidate vs reference (see module docstring for the tie rule)."""
    max_diff, agree, positions, identical, ties, mismatches = 0.0, 0, 0, 0, 0, 0
    for ref, got in zip(reference, candidate):
        max_diff = max(max_diff, (got.logits - ref.logits).abs().max().item())
        agree += int((got.logits.argmax(-1) == ref.logits.argmax(-1)).sum())
        positions += ref.logits.shape[0]
        if got.generated == ref.generated:
            identical += 1
            continue
        k = next((j for j, (a, b) in enumerate(zip(ref.generated, got.generated)) if a != b), None)
        if k is None:  # one is a prefix of the other: one of them did not stop where the other did
            mismatches += 1
            continue
        row = ref.logits[len(ref.prompt) - 1 + k]
        if (row[ref.generated[k]] - row[got.generated[k]]).item() <= 2 * atol:
            ties += 1
        else:
            mismatches += 1
    return {
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agree / positions,
        "greedy_identical": identical,
        "greedy_tie_divergences": ties,
        "greedy_mismatches": mismatches,
    }


def stops_at_end_of_turn(probes: list[Probe], stop_ids: list[int], max_new_tokens: int) -> tuple[bool, int]:
    """Every answer ends at its first end-of-turn token, and an answer shorter than the budget ends with one.

    Returns (ok, how many answers ended early), so a vacuous pass (nothing stopped) is visible.
    """
    ok, stopped = True, 0
    for p in probes:
        hits = [i for i, t in enumerate(p.generated) if t in stop_ids]
        if hits:
            stopped += 1
            ok &= hits[0] == len(p.generated) - 1
        else:
            ok &= len(p.generated) == max_new_tokens
    return ok, stopped


# ---------------------------------------------------------------- files written next to the weights


def generation_config_for(base_dir: Path, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The base's generation config, with every end-of-turn token as EOS so chat answers stop."""
    try:
        config = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        config = GenerationConfig()
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    config.eos_token_id = sorted({i for i in eos if i is not None} | set(end_of_turn_token_ids(tokenizer)))
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    return config


def model_card(
    cfg: PipelineConfig,
    run_id: str,
    base: PreparedBase,
    adapter: AdapterRef,
    adapter_dir: Path,
    dtype: torch.dtype,
    verification: dict,
    report: EvalReport | None,
    data: ValidatedDataset | None,
) -> str:
    lora = json.loads((adapter_dir / "adapter_config.json").read_text())
    metadata = {
        "base_model": base.model_id,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["qlora", "lora", "merged", "qlora-flow"],
        "qlora_flow": {
            "run_id": run_id,
            "base_fingerprint": base.fingerprint,
            "adapter_fingerprint": adapter.fingerprint,
            "data_fingerprint": data.fingerprint if data else None,
            "dtype": str(dtype).removeprefix("torch."),
            "lora": {
                "r": lora["r"],
                "alpha": lora["lora_alpha"],
                "dropout": lora["lora_dropout"],
                "target_modules": sorted(lora["target_modules"]),
                "use_dora": bool(lora.get("use_dora")),
                "use_rslora": bool(lora.get("use_rslora")),
                "trainable_parameters": adapter.trainable_parameters,
            },
            "training": {
                "steps": adapter.steps,
                "tokens_seen": adapter.tokens_seen,
                "learning_rate": cfg.training.learning_rate,
                "lr_scheduler": cfg.training.lr_scheduler,
                "max_seq_length": cfg.training.max_seq_length,
                "per_device_batch_size": cfg.training.per_device_batch_size,
                "gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
                "quantization": "nf4" if cfg.quantization.load_in_4bit else "none",
                "seed": cfg.training.seed,
            },
            "metrics": {"base": report.base_metrics, "tuned": report.tuned_metrics} if report else None,
            "quality_gate": {"passed": report.verdict.passed, "reasons": report.verdict.reasons} if report else None,
            "merge_verification": verification,
        },
    }
    body = (
        f"# {cfg.publish.model_name}\n\n"
        f"LoRA fine-tune of `{base.model_id}` (run `{run_id}`), merged into the 16-bit base and saved as "
        f"{metadata['qlora_flow']['dtype']} safetensors. Load it with `AutoModelForCausalLM.from_pretrained`; "
        "the chat template ships with the tokenizer and generation stops at the end-of-turn token.\n"
    )
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + body


def verify_saved(
    cfg: PipelineConfig,
    out: Path,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    reference: list[Probe],
    saved_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: str,
) -> tuple[dict[str, float | bool | int | str], list[str]]:
    """Reload the saved directory with plain transformers and compare it against the reference; return the
    numbers and the failures, phrased with them."""
    m, budget, stop_ids = cfg.merge, cfg.evaluation.max_new_tokens, end_of_turn_token_ids(tokenizer)
    exact = saved_dtype == compute_dtype == torch.float32
    atol = m.logits_atol if exact else m.logits_atol_16bit
    prompts = [c[:-1] for c in conversations]
    # A float32 save is checked in float32: reading it back in 16 bits would round the merge again.
    reloaded_model = _load(out, torch.float32 if saved_dtype == torch.float32 else compute_dtype, device)
    verifying = StageProgress("merge", "verifying the saved model: prompt", len(prompts))
    reloaded_probes = probe(reloaded_model, tokenizer, prompts, budget, None, reference, verifying)
    del reloaded_model
    _release(device)
    stops_ok, stopped = stops_at_end_of_turn(reloaded_probes, stop_ids, budget)
    eos_masked = end_of_turn_in_training_mask(tokenizer, conversations[0])

    verification: dict[str, float | bool | int | str] = {
        "verified": True,
        "prompts": len(prompts),
        "logits_atol": atol,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
    }
    failures = []
    result = compare(reference, reloaded_probes, atol)
    verification.update({f"reloaded_{k}": v for k, v in result.items()})
    if result["max_abs_logit_diff"] > atol:
        failures.append(f"reloaded: max |logit diff| {result['max_abs_logit_diff']:.3g} > atol {atol:.3g}")
    if result["top1_agreement"] < m.min_top1_agreement:
        failures.append(f"reloaded: top-1 agreement {result['top1_agreement']:.4f} < {m.min_top1_agreement:.4f}")
    if result["greedy_mismatches"]:
        failures.append(
            f"reloaded: {result['greedy_mismatches']} of {len(prompts)} greedy answers differ from the adapter's"
        )
    verification.update(
        stops_at_end_of_turn=stops_ok,
        answers_ended_by_end_of_turn=stopped,
        end_of_turn_in_training_mask="not checkable (no assistant markers)" if eos_masked is None else eos_masked,
    )
    if not stops_ok:
        failures.append("reloaded model generated past the end-of-turn token with its saved generation config")
    if eos_masked is False:
        failures.append(
            "the training assistant mask leaves out the end-of-turn token: the model was not taught to stop"
        )
    return verification, failures


# ---------------------------------------------------------------- the stage


def verification_prompts(
    cfg: PipelineConfig, store: ArtifactStore, data: ValidatedDataset | None, report: EvalReport | None
) -> list[Conversation]:
    """Fixed conversations for verification: the first eval rows, else the eval report's samples."""
    if data is not None:
        conversations = read_conversations(store, data.eval_uri)
    elif report is not None:
        lines = store.read_bytes(store.key_of(report.samples_uri)).decode().splitlines()
        conversations = [
            [{"role": "user", "content": s["prompt"]}, {"role": "assistant", "content": s["reference"]}]
            for s in map(json.loads, lines)
        ]
    else:
        raise ValueError("merge verification needs eval prompts: pass the validated dataset or the eval report")
    if not conversations:
        raise ValueError("merge verification found no eval conversations to use as prompts")
    return conversations[: cfg.merge.verify_prompts]


def merge_adapter(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run_id: str,
    base: PreparedBase,
    adapter: AdapterRef,
    report: EvalReport | None = None,
    data: ValidatedDataset | None = None,
) -> MergedModel:
    """Merge into the 16-bit base, save under runs/<run>/model/, verify (see module docstring), then commit.

    Nothing is committed when verification fails, so a broken merge never looks finished.
    """
    base_dir, adapter_dir = local_path(store, base.full_precision_uri), local_path(store, adapter.uri)
    tokenizer = run_tokenizer(adapter_dir, base_dir)
    stop_ids = end_of_turn_token_ids(tokenizer)
    m, device, budget = cfg.merge, base.device, cfg.evaluation.max_new_tokens
    dtype = resolve_save_dtype(m.save_dtype, base_dir)
    conversations = verification_prompts(cfg, store, data, report) if m.verify else []
    prompts = [c[:-1] for c in conversations]

    compute_dtype = resolve_verify_dtype(m.verify_dtype, dtype, base_dir, device)
    reference: list[Probe] = []
    if m.verify:
        model = PeftModel.from_pretrained(_load(base_dir, compute_dtype, device), adapter_dir)
        answering = StageProgress("merge", "reference answers of the adapter: prompt", len(prompts))
        reference = probe(model, tokenizer, prompts, budget, stop_ids, progress=answering)
        del model
        _release(device)

    key = run_model_key(run_id)
    out = store.workdir(key)

    def merge_and_verify(save_dtype: torch.dtype) -> tuple[dict, list[str]]:
        for stale in out.iterdir():  # a previous attempt may have left differently named shards
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        run_logger("merge").info("[merge] merging the adapter into the %s base", str(save_dtype).removeprefix("torch."))
        merged = PeftModel.from_pretrained(_load(base_dir, save_dtype, device), adapter_dir).merge_and_unload()
        merged.generation_config = generation_config_for(base_dir, tokenizer)
        merged.save_pretrained(out, max_shard_size=m.max_shard_size)
        tokenizer.save_pretrained(out)
        del merged
        _release(device)
        if not m.verify:
            return {"verified": False}, []
        return verify_saved(cfg, out, tokenizer, conversations, reference, save_dtype, compute_dtype, device)

    verification, failures = merge_and_verify(dtype)
    if failures and m.save_dtype == "auto" and dtype != torch.float32:
        # An update smaller than half a 16-bit ulp of the base weight is rounded away by a 16-bit merge
        # (seen with short trainings). Ship a float32 merge that matches the adapter rather than a
        # 16-bit one that does not; the reason is kept in verification.json and the model card.
        log.warning("16-bit merge failed verification (%s); merging in float32 instead", "; ".join(failures))
        rejected = "; ".join(failures)
        dtype = torch.float32
        verification, failures = merge_and_verify(dtype)
        verification["float32_fallback_reason"] = rejected
    if failures:
        raise MergeVerificationError(f"merged model at {store.uri(key)} failed verification: " + "; ".join(failures))

    (out / "verification.json").write_text(json.dumps(verification, indent=2, sort_keys=True))
    (out / "README.md").write_text(
        model_card(cfg, run_id, base, adapter, adapter_dir, dtype, verification, report, data)
    )
    uri = store.commit(key)
    return MergedModel(
        uri=uri,
        fingerprint=combine("merged-model", base.fingerprint, adapter.fingerprint, str(dtype), library_versions()),
        dtype=str(dtype).removeprefix("torch."),
        verification=verification,
    )


def merge_or_reuse(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run_id: str,
    base: PreparedBase,
    adapter: AdapterRef,
    report: EvalReport | None = None,
    data: ValidatedDataset | None = None,
) -> MergedModel:
    """The verified merge of an earlier run with the same adapter and merge settings, where it is stored
    (cache/merged/<fp> names it; its model card names that run), else merge_adapter, recorded there."""
    fingerprints = merge_fingerprints(cfg, base, adapter, data)
    fingerprint, cached = find_entry(store, "merged", fingerprints, MergeEntry) or (fingerprints[0], None)
    if cached is not None:
        try:
            present = store.is_complete(store.key_of(cached.merged.uri))
        except ValueError:  # names nothing in this store (entries read back map keys and moved-store URIs here)
            present = False
        if present:
            log.info(
                "adapter %s was already merged and verified by run %s; reusing %s",
                adapter.fingerprint[:16],
                cached.run_id,
                cached.merged.uri,
            )
            return cached.merged
        log.warning(
            "%s names merged model %s, which is gone or incomplete; merging again",
            store.uri(entry_key("merged", fingerprint)),
            cached.merged.uri,
        )
    merged = merge_adapter(cfg, store, run_id, base, adapter, report, data)
    write_entry(store, "merged", fingerprints[0], MergeEntry(merged=merged, run_id=run_id))
    return merged


# No retries: a verification failure is deterministic and would only repeat.
@task(name="merge")
def merge_task(
    cfg: PipelineConfig,
    run_id: str,
    base: PreparedBase,
    adapter: AdapterRef,
    report: EvalReport | None = None,
    data: ValidatedDataset | None = None,
) -> MergedModel:
    return merge_or_reuse(cfg, open_store(cfg.execution), run_id, base, adapter, report, data)
