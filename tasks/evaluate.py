"""Evaluate a trained adapter against its base model on the held-out split, and decide the quality gate.

What is evaluated: the 16-bit base at the compute dtype with the adapter applied unmerged
(PeftModel.from_pretrained), not the NF4 base the adapter was trained on. The merged model we ship is
exactly adapter-on-16-bit-base, so this measures what will be published; the small NF4-vs-16-bit gap
between training and serving is part of what the numbers show. Base metrics come from the same
model object with the adapter disabled, so the base is loaded once.

Loss masking: a token counts when it belongs to an assistant turn's content or is the end-of-turn
token that closes it. Assistant turns are located by rendering with the model's own chat template:
turn i starts where `render(messages[:i], add_generation_prompt=True)` ends and ends where
`render(messages[:i+1])` ends; tokens are assigned by their character offsets. This works for any
template whose renders of a prefix of the conversation are prefixes of the full render (ChatML,
Llama 3, Mistral, Gemma...), and raises a clear error for one that is not; for ChatML it equals the
training stage's `{% generation %}` assistant mask (tested). Loss is the
token-weighted mean over all assistant tokens of the split; perplexity is exp(loss).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from peft import PeftModel
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from transformers import GenerationConfig, PreTrainedTokenizerBase

from qlora_flow.artifacts import publish_eval_samples, publish_loss_curve
from qlora_flow.config import GateRules, PipelineConfig
from qlora_flow.console import StageProgress
from qlora_flow.errors import is_retryable
from qlora_flow.metrics import exact_match, generation_metrics, token_f1
from qlora_flow.model_events import model_resource
from qlora_flow.models import end_of_turn_token_ids, load_full_precision_model, load_tokenizer
from qlora_flow.refs import AdapterRef, EvalReport, GateVerdict, LossPoint, PreparedBase, ValidatedDataset
from qlora_flow.stage_cache import Measurement, entry_key, evaluation_fingerprint, read_entry, write_entry
from qlora_flow.store import ArtifactStore, open_store

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]


# ---------------------------------------------------------------- reading inputs


def local_path(store: ArtifactStore, uri: str) -> Path:
    """A local directory/file for a reference's URI: fetched from the store, or the path itself when the
    URI lies outside the store (e.g. a base model used in place from a local directory)."""
    try:
        key = store.key_of(uri)
    except ValueError:
        if Path(uri).exists():
            return Path(uri)
        raise
    return store.fetch(key)


def read_conversations(store: ArtifactStore, uri: str) -> list[Conversation]:
    """The `messages` column of a validated split (parquet)."""
    import pyarrow.parquet as pq

    table = pq.read_table(store.fetch_file(uri))
    return [[{"role": m["role"], "content": m["content"]} for m in row] for row in table.column("messages").to_pylist()]


def run_tokenizer(adapter_dir: Path, base_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the adapter (what training used), else the base's."""
    return load_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_dir)


# ---------------------------------------------------------------- loss on assistant tokens


def _render(tokenizer: PreTrainedTokenizerBase, messages: Conversation, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_token_mask(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and which of them are scored (see module docstring)."""
    full = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, turn = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1])
        if not (turn.startswith(prompt) and full.startswith(turn)):
            raise ValueError(
                "the chat template does not render conversation prefixes as prefixes of the full conversation; "
                "cannot locate assistant tokens for the loss mask"
            )
        spans.append((len(prompt), len(turn)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    stops = set(end_of_turn_token_ids(tokenizer))
    mask = [False] * len(ids)
    for start, end in spans:
        # Score from the first token that covers assistant text through the first end-of-turn token;
        # whatever the template renders after it (a newline) is never generated by the model.
        for t, (a, b) in enumerate(offsets):
            if b > start and a < end:
                mask[t] = True
                if ids[t] in stops:
                    break
    return ids, mask


@torch.no_grad()
def assistant_loss(
    model,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    batch_size: int,
    progress: StageProgress | None = None,
) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over assistant tokens, and how many tokens were scored."""
    device = next(model.parameters()).device
    encoded = [assistant_token_mask(tokenizer, c) for c in conversations]
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = encoded[i : i + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (ids, mask) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        shifted = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += int((shifted != -100).sum())
        if progress:
            progress.advance(len(batch))
    if count == 0:
        raise ValueError("the evaluation split has no assistant tokens to score")
    return total / count, count


# ---------------------------------------------------------------- generation


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Conversation],
    max_new_tokens: int,
    batch_size: int,
    stop_ids: list[int],
    progress: StageProgress | None = None,
) -> list[list[int]]:
    """Greedy continuations (left-padded batches), each cut after its first end-of-turn token."""
    device = next(model.parameters()).device
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id
    )
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [_render(tokenizer, p, True) for p in prompts[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generated = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :]
            outputs.extend(cut_at_stop(row.tolist(), stop_ids) for row in generated)
            if progress:
                progress.advance(len(texts))
    finally:
        tokenizer.padding_side = side
    return outputs


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """Tokens up to and including the first end-of-turn token (batch padding after it is dropped)."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[: i + 1]
    return ids


def decode_answer(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _model_metrics(
    model, tokenizer, conversations: list[Conversation], cfg: PipelineConfig, stop_ids: list[int], label: str
) -> tuple[dict[str, float], list[str]]:
    scoring = StageProgress("evaluate", f"{label} model: loss", len(conversations))
    loss, n_tokens = assistant_loss(model, tokenizer, conversations, cfg.evaluation.batch_size, scoring)
    metrics = {"loss": loss, "perplexity": math.exp(loss), "assistant_tokens": float(n_tokens)}
    samples = conversations[: cfg.evaluation.max_generation_samples]
    if not samples:
        return metrics, []
    generating = StageProgress("evaluate", f"{label} model: generation", len(samples))
    ids = greedy_generate(
        model, tokenizer, [c[:-1] for c in samples], cfg.evaluation.max_new_tokens, cfg.evaluation.batch_size, stop_ids,
        generating,
    )  # fmt: skip
    answers = [decode_answer(tokenizer, i) for i in ids]
    metrics.update(generation_metrics(answers, [c[-1]["content"] for c in samples]))
    metrics["generation_samples"] = float(len(samples))
    # share of answers that ended with an end-of-turn token: did the model learn to stop?
    metrics["stop_rate"] = sum(bool(i) and i[-1] in stop_ids for i in ids) / len(ids)
    return metrics, answers


# ---------------------------------------------------------------- quality gate


def production_metrics(store: ArtifactStore, cfg: PipelineConfig) -> tuple[str | None, dict[str, float] | None]:
    """The current production run id and its tuned metrics; (None, None) when no alias exists yet.

    An alias whose run has no eval report raises: a gate that cannot check must not pass silently.
    """
    alias_key = f"models/{cfg.publish.model_name}/{cfg.publish.alias}.json"
    if not store.exists(alias_key):
        return None, None
    prod_run = store.read_json(alias_key)["run_id"]
    report_key = f"runs/{prod_run}/eval/report.json"
    if not store.exists(report_key):
        raise FileNotFoundError(
            f"{store.uri(alias_key)} points at run {prod_run}, which has no eval report at {store.uri(report_key)}"
        )
    return prod_run, store.read_json(report_key)["tuned_metrics"]


def decide_gate(
    rules: GateRules,
    base: dict[str, float],
    tuned: dict[str, float],
    production: dict[str, float] | None,
    production_run: str | None = None,
) -> GateVerdict:
    """Apply every rule; the verdict passes only if all do. Each reason states the numbers."""
    reasons: list[str] = []
    passed = True

    improvement = base["loss"] - tuned["loss"]
    ok = improvement >= rules.min_loss_improvement
    passed &= ok
    reasons.append(
        f"{'PASS' if ok else 'FAIL'} loss improvement {improvement:.4f} (base {base['loss']:.4f} -> tuned "
        f"{tuned['loss']:.4f}) {'>=' if ok else '<'} required {rules.min_loss_improvement:.4f}"
    )

    em = tuned.get("exact_match")
    if rules.min_exact_match is not None:
        ok = em is not None and em >= rules.min_exact_match
        passed &= ok
        shown = "not measured (no generation samples)" if em is None else f"{em:.4f}"
        reasons.append(f"{'PASS' if ok else 'FAIL'} exact match {shown}, required >= {rules.min_exact_match:.4f}")

    if rules.max_regression_vs_production is not None:
        if production is None:
            reasons.append("PASS no production model yet; regression check not applicable")
        else:
            floor = production.get("exact_match", 0.0) - rules.max_regression_vs_production
            ok = em is not None and em >= floor
            passed &= ok
            shown = "not measured" if em is None else f"{em:.4f}"
            reasons.append(
                f"{'PASS' if ok else 'FAIL'} exact match {shown} vs production run {production_run} "
                f"{production.get('exact_match', 0.0):.4f}: floor {floor:.4f} "
                f"(allowed regression {rules.max_regression_vs_production:.4f})"
            )
    return GateVerdict(passed=passed, reasons=reasons)


# ---------------------------------------------------------------- reports


def plot_loss_curve(history: list[LossPoint], path: Path) -> bool:
    """Training (and eval, where logged) loss per step as a PNG; False when there is nothing to plot."""
    if not history:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p.step for p in history], [p.loss for p in history], marker=".", label="train loss")
    evals = [p for p in history if p.eval_loss is not None]
    if evals:
        ax.plot([p.step for p in evals], [p.eval_loss for p in evals], marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def comparison_markdown(report: EvalReport, run_id: str) -> str:
    columns = ["base", "tuned"] + (["production"] if report.production_metrics else [])
    lines = [f"# Evaluation of run `{run_id}`", "", "| metric | " + " | ".join(columns) + " | tuned - base |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for name in report.tuned_metrics:
        values = [report.base_metrics.get(name), report.tuned_metrics[name]]
        if report.production_metrics:
            values.append(report.production_metrics.get(name))
        cells = ["" if v is None else f"{v:.4f}" for v in values]
        delta = report.tuned_metrics[name] - report.base_metrics[name] if name in report.base_metrics else None
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if delta is None else f'{delta:+.4f}'} |")
    lines += ["", f"**Quality gate: {'passed' if report.verdict.passed else 'FAILED'}**", ""]
    lines += [f"- {r}" for r in report.verdict.reasons]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the stage


def measure(
    cfg: PipelineConfig, store: ArtifactStore, conversations: list[Conversation], base: PreparedBase, adapter: AdapterRef
) -> Measurement:
    """Metrics and sample answers of the base (adapter disabled) and the tuned model, loaded once."""
    adapter_dir, base_dir = local_path(store, adapter.uri), local_path(store, base.full_precision_uri)
    tokenizer = run_tokenizer(adapter_dir, base_dir)
    stop_ids = end_of_turn_token_ids(tokenizer)

    model = load_full_precision_model(base_dir, getattr(torch, base.compute_dtype), base.device)
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with model.disable_adapter():
        base_metrics, base_answers = _model_metrics(model, tokenizer, conversations, cfg, stop_ids, "base")
    tuned_metrics, tuned_answers = _model_metrics(model, tokenizer, conversations, cfg, stop_ids, "tuned")
    del model
    return Measurement(
        base_metrics=base_metrics, tuned_metrics=tuned_metrics, base_answers=base_answers, tuned_answers=tuned_answers
    )


def evaluate_adapter(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run_id: str,
    data: ValidatedDataset,
    base: PreparedBase,
    adapter: AdapterRef,
) -> EvalReport:
    """Base vs tuned on the eval split, sample generations, loss curve and gate verdict under runs/<run>/eval/.

    The numbers come from cache/eval/<fp> when this adapter was already measured on this split with these
    settings (qlora_flow.stage_cache); the gate is decided again on every run, against today's production.
    """
    conversations = read_conversations(store, data.eval_uri)
    fingerprint = evaluation_fingerprint(cfg, data, base, adapter)
    measured = read_entry(store, "eval", fingerprint, Measurement)
    if measured is None:
        measured = measure(cfg, store, conversations, base, adapter)
        write_entry(store, "eval", fingerprint, measured)
    else:
        log.info("adapter %s already evaluated with these settings (%s); reusing its numbers", adapter.fingerprint[:16],
                 store.uri(entry_key("eval", fingerprint)))  # fmt: skip
    base_metrics, tuned_metrics = measured.base_metrics, measured.tuned_metrics
    base_answers, tuned_answers = measured.base_answers, measured.tuned_answers

    prod_run, prod_metrics = (None, None)
    if cfg.evaluation.gate.max_regression_vs_production is not None:
        prod_run, prod_metrics = production_metrics(store, cfg)
    verdict = decide_gate(cfg.evaluation.gate, base_metrics, tuned_metrics, prod_metrics, prod_run)

    key = f"runs/{run_id}/eval"
    out = store.workdir(key)
    samples = [
        {
            "index": i,
            "prompt": c[-2]["content"] if len(c) > 1 else "",
            "reference": c[-1]["content"],
            "base": b,
            "tuned": t,
            "tuned_exact_match": exact_match(t, c[-1]["content"]),
            "tuned_token_f1": round(token_f1(t, c[-1]["content"]), 4),
        }
        for i, (c, b, t) in enumerate(zip(conversations, base_answers, tuned_answers))
    ]
    (out / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    has_plot = plot_loss_curve(adapter.loss_history, out / "loss_curve.png")
    uri = store.uri(key)
    report = EvalReport(
        uri=uri,
        base_metrics=base_metrics,
        tuned_metrics=tuned_metrics,
        production_metrics=prod_metrics,
        samples_uri=store.uri(f"{key}/samples.jsonl"),
        loss_plot_uri=store.uri(f"{key}/loss_curve.png") if has_plot else None,
        verdict=verdict,
        fingerprint=fingerprint,
    )
    document = report.model_dump(mode="json") | {
        "run_id": run_id,
        "production_run_id": prod_run,
        "data_fingerprint": data.fingerprint,
        "adapter_fingerprint": adapter.fingerprint,
        "base_fingerprint": base.fingerprint,
        "eval_rows": len(conversations),
    }
    (out / "report.json").write_text(json.dumps(store.as_keys(document), indent=2, sort_keys=True))
    plot_link = "\n![loss curve](loss_curve.png)\n" if has_plot else ""
    (out / "report.md").write_text(comparison_markdown(report, run_id) + plot_link)
    store.commit(key)
    return report


def announce(
    cfg: PipelineConfig, store: ArtifactStore, run_id: str, report: EvalReport, loss_history: list[LossPoint] = ()
) -> None:
    """Prefect artifacts for the UI, and a `model.rejected` event that automations can react to."""
    create_markdown_artifact(comparison_markdown(report, run_id), key="eval-comparison", description=f"run {run_id}")
    samples = [json.loads(line) for line in store.read_bytes(store.key_of(report.samples_uri)).decode().splitlines()]
    publish_eval_samples(run_id, samples, report.samples_uri)
    if loss_history or report.loss_plot_uri:
        publish_loss_curve(store, run_id, loss_history, report.loss_plot_uri)
    if not report.verdict.passed:
        emit_event(
            event="model.rejected",
            resource=model_resource(cfg),
            payload={
                "run_id": run_id,
                "reasons": report.verdict.reasons,
                "base_metrics": report.base_metrics,
                "tuned_metrics": report.tuned_metrics,
                "production_metrics": report.production_metrics,
            },
        )


@task(name="evaluate", retries=1, retry_delay_seconds=10, retry_condition_fn=is_retryable)
def evaluate_task(
    cfg: PipelineConfig, run_id: str, data: ValidatedDataset, base: PreparedBase, adapter: AdapterRef
) -> EvalReport:
    store = open_store(cfg.execution)
    report = evaluate_adapter(cfg, store, run_id, data, base, adapter)
    announce(cfg, store, run_id, report, adapter.loss_history)
    return report
