"""Stage 1: validate the training data and cut it into train/eval splits.

Reads every supported source in chunks, normalises the three data shapes to `messages`,
enforces the pandera contract (qlora_flow.contracts), drops duplicates and eval leakage, and
writes `train.parquet`, `eval.parquet`, `quarantine.jsonl` and `report.json` under
`cache/data/<fingerprint>/`. Every input row ends up in exactly one of train, eval or quarantine.

The fingerprint hashes every normalised row in sorted order (plus the settings that shape the
outputs), so the same conversations in another file format or order land on the same cache
entry. It is known only after the pass, so the pass writes into a staging directory; a small
pointer `cache/data-sources/<hash of the source bytes>.json` lets an unchanged file skip the
pass entirely. Pass/fail is re-derived from report.json on every call, so thresholds can change
without invalidating the cache. A cache hit reports the files of the run that produced it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from qlora_flow import contracts, readers
from qlora_flow.config import ConfigError, DataConfig, PipelineConfig
from qlora_flow.contracts import (
    CHECKS,
    INPUT_SCHEMAS,
    SHAPE_COLUMNS,
    TURNS,
    DataValidationError,
    failures,
    mark_invalid_utf8,
)
from qlora_flow.errors import is_retryable
from qlora_flow.fingerprint import combine, hash_tree, sha256_file
from qlora_flow.readers import RawRow
from qlora_flow.refs import ValidatedDataset
from qlora_flow.store import ArtifactStore, open_store

__all__ = ["DataValidationError", "validate_dataset", "validate_dataset_task"]

CHUNK_ROWS = 50_000
MAX_EXAMPLES = 5
_MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_SCHEMA = pa.schema([("messages", _MESSAGES_TYPE)])
_CODE_FILES = (Path(contracts.__file__), Path(readers.__file__), Path(__file__))
_OUTPUTS = ("train.parquet", "eval.parquet", "quarantine.jsonl")

Messages = list[dict]
Reason = dict[str, str]


@dataclass(frozen=True)
class _Source:
    split: str  # "train" or "eval": which config field the file came from
    uri: str
    path: Path
    fmt: str


@dataclass
class _Chunk:
    rows: list[RawRow]
    messages: list[Messages | None]  # None once a row is rejected
    reasons: list[list[Reason]] = field(init=False)

    def __post_init__(self) -> None:
        self.reasons = [[] for _ in self.rows]

    def reject(self, i: int, check: str, field_name: str | None, message: str) -> None:
        self.reasons[i].append({"check": check, "field": field_name or "", "message": message})
        self.messages[i] = None


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)


def _loose(messages: Messages) -> str:
    """Whitespace- and case-insensitive form of a conversation, for near-duplicates and leakage."""
    return "\x1e".join(f"{t['role']}\x1f{' '.join(t['content'].lower().split())}" for t in messages)


def _got(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- reading and normalising


def _detect_shape(data: DataConfig, chunk: list[RawRow], uri: str) -> str:
    """The data shape of a source, from the columns of its first chunk (after column_mapping)."""
    candidates = list(SHAPE_COLUMNS) if data.format == "auto" else [data.format]
    columns = {data.column_mapping.get(k, k) for r in chunk if isinstance(r.value, dict) for k in r.value}
    for shape in candidates:
        if set(SHAPE_COLUMNS[shape]) <= columns:
            return shape
    if not columns:  # nothing parseable to look at: the rows are quarantined as unparseable
        return candidates[0]
    expected = " | ".join("+".join(SHAPE_COLUMNS[shape]) for shape in candidates)
    raise readers.file_error(
        "missing_columns",
        f"{uri} has columns {sorted(columns)}; expected {expected} (map other names with data.column_mapping)",
    )


def _to_messages(shape: str, row: dict) -> Messages:
    if shape == "messages":
        return [{"role": t.get("role"), "content": t.get("content")} for t in row["messages"]]
    if shape == "prompt_completion":
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    context = row.get("input")
    prompt = f"{row['instruction']}\n\n{context}" if isinstance(context, str) and context.strip() else row["instruction"]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _decode_json_cell(value: object) -> object:
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(value)
    return value


def _normalise(data: DataConfig, shape: str, rows: list[RawRow], text_cells: bool = False) -> _Chunk:
    """Parse errors and the shape's input schema, then `messages` for every row that passed.

    text_cells: the format stores only strings (CSV), so chats arrive as JSON text to decode.
    """
    chunk = _Chunk(rows, [None] * len(rows))
    source_name = {v: k for k, v in data.column_mapping.items()}
    schema = INPUT_SCHEMAS[shape]
    records: dict[int, dict] = {}
    for i, row in enumerate(rows):
        if row.error:
            chunk.reject(i, row.error[0], None, row.error[1])
        else:
            records[i] = {data.column_mapping.get(k, k): v for k, v in row.value.items()}
            if text_cells and shape == "messages":
                records[i]["messages"] = _decode_json_cell(records[i].get("messages"))
    cells = [{k: mark_invalid_utf8(v) for k, v in r.items()} for r in records.values()]
    # every schema column must exist in the frame, or a chunk lacking one would pass unchecked;
    # object dtype keeps values as read, so a type check sees an int as an int
    frame = pd.DataFrame(cells, index=list(records), columns=list(schema.columns), dtype=object)
    for case in failures(schema, frame):
        column = case.column
        chunk.reject(case.index, case.check, source_name.get(column, column), f"{CHECKS[case.check]} (got {_got(case.value)})")
    for i, record in records.items():
        if not chunk.reasons[i]:
            messages = _to_messages(shape, record)
            if data.system_prompt and messages[0].get("role") != "system":
                messages.insert(0, {"role": "system", "content": data.system_prompt})
            chunk.messages[i] = messages
    return chunk


def _check_turns(chunk: _Chunk) -> None:
    cols: dict[str, list] = {"row": [], "turn": [], "n_turns": [], "role": [], "content": []}
    for i, messages in enumerate(chunk.messages):
        for t, turn in enumerate(messages or ()):
            cols["row"].append(i)
            cols["turn"].append(t)
            cols["n_turns"].append(len(messages))
            cols["role"].append(mark_invalid_utf8(turn["role"]))
            cols["content"].append(mark_invalid_utf8(turn["content"]))
    turns = pd.DataFrame({k: pd.Series(v, dtype=object if k in ("role", "content") else "int64") for k, v in cols.items()})
    for case in failures(TURNS, turns):
        turn = turns.loc[case.index]
        where = f"messages[{turn['turn']}]"
        if case.column:
            chunk.reject(turn["row"], case.check, f"{where}.{case.column}", f"{CHECKS[case.check]} (got {_got(case.value)})")
        else:
            chunk.reject(turn["row"], case.check, f"{where}.role", f"{CHECKS[case.check]} (turn {turn['turn']} is {turn['role']!r})")


# ---------------------------------------------------------------- token lengths


_BYTE_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "WhitespaceSplit"}


def _tokens_never_shorter_than_a_byte(tokenizer) -> bool:
    """True for byte-level BPE without a normalizer or added prefix space (GPT-2, Llama 3, Qwen,
    SmolLM): every token then covers at least one byte of the text, so a rendered chat of at most
    max_seq_length bytes fits without being tokenised."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return (
        spec.get("normalizer") is None
        and spec["model"]["type"] == "BPE"
        and any(p.get("type") == "ByteLevel" for p in steps)
        and all(p.get("type") in _BYTE_SAFE_PRE_TOKENIZERS and not p.get("add_prefix_space") for p in steps)
    )


@dataclass(frozen=True)
class _Lengths:
    tokenizer: object
    limit: int
    byte_bound: bool

    def count(self, conversations: list[Messages]) -> list[int]:
        """Tokens per rendered chat: exact where it may exceed the limit, else possibly an upper bound."""
        if not conversations:
            return []
        texts = self.tokenizer.apply_chat_template(conversations, tokenize=False)
        counts = [len(t.encode("utf-8")) for t in texts] if self.byte_bound else [self.limit + 1] * len(texts)
        unsure = [i for i, n in enumerate(counts) if n > self.limit]
        if unsure:
            # apply_chat_template(tokenize=True) also encodes without extra special tokens: same count
            ids = self.tokenizer([texts[i] for i in unsure], add_special_tokens=False, return_attention_mask=False)["input_ids"]
            for i, row_ids in zip(unsure, ids):
                counts[i] = len(row_ids)
        return counts

    def truncate(self, messages: Messages, n_tokens: int) -> Messages | None:
        """Cut the final assistant reply until the rendered chat fits; None if even an empty reply won't."""
        ids = self.tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        while n_tokens > self.limit and ids:
            ids = ids[: len(ids) - (n_tokens - self.limit)]
            # a cut inside a multi-byte character decodes to U+FFFD; drop it with trailing space
            content = self.tokenizer.decode(ids).rstrip().rstrip("\ufffd").rstrip()
            if not content:
                return None
            messages = messages[:-1] + [{"role": "assistant", "content": content}]
            n_tokens = self.count([messages])[0]
        return messages if n_tokens <= self.limit else None


def _check_lengths(chunk: _Chunk, lengths: _Lengths, policy: str) -> tuple[int, int]:
    """Apply the overlength policy; returns (rows truncated, rows dropped by policy)."""
    limit = lengths.limit
    alive = [i for i, m in enumerate(chunk.messages) if m is not None]
    frame = pd.DataFrame({"n_tokens": lengths.count([chunk.messages[i] for i in alive])}, index=alive, dtype="int64")
    truncated = dropped = 0
    for case in failures(contracts.length_schema(limit), frame):
        i, n = case.index, int(case.value)
        if policy == "truncate":
            fitted = lengths.truncate(chunk.messages[i], n)
            if fitted is not None:
                chunk.messages[i] = fitted
                truncated += 1
                continue
            message = f"{n} tokens > max_seq_length {limit}, and cutting the assistant reply cannot make it fit"
        else:
            message = f"{n} tokens > max_seq_length {limit} (overlength_policy={policy})"
            dropped += policy == "drop"
        chunk.reject(i, "overlength", "messages", message)
    return truncated, dropped


# ---------------------------------------------------------------- sources and fingerprint


def _sources(cfg: PipelineConfig, stack: ExitStack) -> list[_Source]:
    """Local copies of the configured files, eval first: its prompts must be known to check train for leakage."""
    wanted = [("eval", cfg.data.eval_path)] if cfg.data.eval_path else []
    sources = []
    for split, uri in wanted + [("train", cfg.data.train_path)]:
        path = stack.enter_context(readers.local_copy(uri, cfg.execution.s3, f"{split}_path"))
        sources.append(_Source(split, uri, path, readers.detect_format(path, uri)))
    return sources


def _chunks(cfg: PipelineConfig, source: _Source) -> Iterator[tuple[str, list[RawRow]]]:
    shape = None
    for rows in readers.iter_chunks(source.path, source.fmt, source.uri, CHUNK_ROWS):
        shape = shape or _detect_shape(cfg.data, rows, source.uri)
        yield shape, rows
    if shape is None:
        raise readers.file_error("empty_file", f"data.{source.split}_path {source.uri} holds no rows")


def _tokenizer_identity(tokenizer) -> str:
    if not tokenizer.chat_template:
        raise ConfigError("the tokenizer has no chat template; token lengths of chats cannot be measured")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else _canonical(tokenizer.get_vocab())
    return combine(hashlib.sha256(vocab.encode()).hexdigest(), tokenizer.chat_template)


def _settings(cfg: PipelineConfig, tokenizer) -> str:
    """Everything besides the rows that shapes the outputs; thresholds are left out on purpose."""
    split = {"eval_file": True} if cfg.data.eval_path else {"eval_fraction": cfg.data.eval_fraction, "split_seed": cfg.data.split_seed}
    code = hashlib.sha256(b"".join(p.read_bytes() for p in _CODE_FILES)).hexdigest()
    lengths = {"max_seq_length": cfg.training.max_seq_length, "overlength_policy": cfg.data.overlength_policy}
    return combine(split, lengths, _tokenizer_identity(tokenizer), code)


def _source_key(cfg: PipelineConfig, sources: list[_Source], settings: str) -> str:
    """Pointer from the exact source bytes (and the config reading them) to the content fingerprint."""
    files = [(s.split, hash_tree(s.path) if s.path.is_dir() else sha256_file(s.path)) for s in sources]
    reading = cfg.data.model_dump(include={"format", "column_mapping", "system_prompt"})
    return f"cache/data-sources/{combine(files, reading, settings)}.json"


# ---------------------------------------------------------------- the validation pass


def _in_eval(prompt_key: bytes, data: DataConfig) -> bool:
    """Seeded split keyed on the normalised prompt: stable under reordering, and rows sharing a
    prompt always land on the same side, so the split itself cannot leak eval prompts into train."""
    h = hashlib.blake2b(prompt_key, digest_size=8, key=str(data.split_seed).encode()).digest()
    return int.from_bytes(h, "big") / 2**64 < data.eval_fraction


def _validate_into(workdir: Path, cfg: PipelineConfig, sources: list[_Source], tokenizer) -> dict:
    counts: Counter[str] = Counter()
    totals = Counter()
    examples: list[dict] = []
    eval_prompts: set[bytes] = set()
    per_source = []
    digests: list[bytes] = []  # one per input row, for the order-independent content hash
    lengths = _Lengths(tokenizer, cfg.training.max_seq_length, _tokens_never_shorter_than_a_byte(tokenizer))
    with ExitStack() as stack:
        writers = {s: stack.enter_context(pq.ParquetWriter(workdir / f"{s}.parquet", _SCHEMA)) for s in ("train", "eval")}
        quarantine = stack.enter_context(open(workdir / "quarantine.jsonl", "w", encoding="utf-8"))
        for source in sources:
            seen_exact: set[bytes] = set()
            seen_loose: set[bytes] = set()
            n_rows = 0
            shape = ""
            for shape, rows in _chunks(cfg, source):
                n_rows += len(rows)
                chunk = _normalise(cfg.data, shape, rows, text_cells=source.fmt == "csv")
                digests += [
                    _digest(source.split + "\x1d" + _canonical(m if m is not None else r.value))
                    for r, m in zip(chunk.rows, chunk.messages)
                ]
                _check_turns(chunk)
                truncated, dropped = _check_lengths(chunk, lengths, cfg.data.overlength_policy)
                totals["truncated"] += truncated
                totals["dropped"] += dropped
                out: dict[str, list] = {"train": [], "eval": []}
                for i, messages in enumerate(chunk.messages):
                    if messages is None:
                        continue
                    exact, loose = _digest(_canonical(messages)), _digest(_loose(messages))
                    prompt = _digest(_loose(messages[:-1]))
                    if exact in seen_exact:
                        chunk.reject(i, "duplicate", "messages", CHECKS["duplicate"])
                    elif loose in seen_loose:
                        chunk.reject(i, "near_duplicate", "messages", CHECKS["near_duplicate"])
                    if source.split == "train" and prompt in eval_prompts:
                        chunk.reject(i, "leakage", "messages", f"prompt also appears in {cfg.data.eval_path}")
                    if chunk.messages[i] is None:
                        continue
                    seen_exact.add(exact)
                    seen_loose.add(loose)
                    if source.split == "eval":
                        eval_prompts.add(prompt)
                        out["eval"].append(messages)
                    else:
                        out["eval" if not cfg.data.eval_path and _in_eval(prompt, cfg.data) else "train"].append(messages)
                for split, kept in out.items():
                    if kept:
                        writers[split].write_table(pa.Table.from_pydict({"messages": kept}, schema=_SCHEMA))
                    totals[split] += len(kept)
                for row, reasons in zip(chunk.rows, chunk.reasons):
                    if not reasons:
                        continue
                    totals["rejected"] += 1
                    counts.update({r["check"] for r in reasons})
                    entry = {"file": source.uri, "split": source.split, "row": row.number, "raw": row.value, "reasons": reasons}
                    quarantine.write(_canonical(entry) + "\n")
                    if len(examples) < MAX_EXAMPLES:
                        examples.append({"file": source.uri, "row": row.number, **reasons[0]})
            totals["input"] += n_rows
            per_source.append({"file": source.uri, "split": source.split, "format": source.fmt, "shape": shape, "rows": n_rows})
    # the "nothing lost" invariant: every input row is in exactly one of train, eval, quarantine
    assert totals["train"] + totals["eval"] + totals["rejected"] == totals["input"], totals
    digests.sort()
    return {
        "content_hash": hashlib.sha256(b"".join(digests)).hexdigest(),
        "shapes": {s["split"]: s["shape"] for s in per_source},
        "sources": per_source,
        "n_input_rows": totals["input"],
        "n_train": totals["train"],
        "n_eval": totals["eval"],
        "n_rejected": totals["rejected"],
        "n_dropped_by_policy": totals["dropped"],
        "n_truncated": totals["truncated"],
        "checks": dict(sorted(counts.items())),
        "examples": examples,
        "row_numbers": "1-based line number for JSONL, record number for other formats",
    }


# ---------------------------------------------------------------- decision


def _enforce(report: dict, data: DataConfig) -> None:
    """Raise DataValidationError when the report breaks the thresholds of the current config."""
    n_input = report["n_input_rows"]
    # rows dropped by overlength_policy=drop are removed on purpose, not counted as bad data
    counted = report["n_rejected"] - report["n_dropped_by_policy"]
    problems: list[str] = []
    verdicts: dict[str, int] = {}
    if counted / n_input > data.max_rejected_fraction:
        verdicts["rejected_fraction"] = counted
        problems.append(
            f"{counted} of {n_input} rows rejected ({counted / n_input:.2%} > max_rejected_fraction "
            f"{data.max_rejected_fraction:.2%}) [rejected_fraction]"
        )
    for split, minimum in (("train", data.min_train_rows), ("eval", data.min_eval_rows)):
        if report[f"n_{split}"] < minimum:
            verdicts["min_rows"] = 1
            problems.append(f"{split} split has {report[f'n_{split}']} rows, data.min_{split}_rows is {minimum} [min_rows]")
    if not problems:
        return
    lines = ["dataset validation failed:", *(f"  {p}" for p in problems)]
    if report["checks"]:
        lines.append("rejected rows per check:")
        lines += [f"  {check}: {n} ({CHECKS[check]})" for check, n in report["checks"].items()]
        lines.append(f"first {len(report['examples'])} offending rows:")
        lines += [f"  {e['file']}:{e['row']} {e['field'] or '(row)'} [{e['check']}] {e['message']}" for e in report["examples"]]
    lines.append(f"quarantine: {report['quarantine_uri']}  report: {report['report_uri']}")
    raise DataValidationError("\n".join(lines), report["checks"] | verdicts, report)


def validate_dataset(cfg: PipelineConfig, store: ArtifactStore, tokenizer) -> ValidatedDataset:
    with ExitStack() as stack:
        sources = _sources(cfg, stack)
        settings = _settings(cfg, tokenizer)
        source_key = _source_key(cfg, sources, settings)
        fingerprint = store.read_json(source_key)["fingerprint"] if store.exists(source_key) else None
        if fingerprint is None or store.verified(f"cache/data/{fingerprint}") is None:
            # the fingerprint hashes every normalised row, so it is known only after the pass:
            # validate into a staging directory, then move the result under its key
            staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qlora-flow-validate-")))
            report = _validate_into(staging, cfg, sources, tokenizer)
            fingerprint = combine(report["content_hash"], settings)
            key = f"cache/data/{fingerprint}"
            if store.verified(key) is None:  # else the same rows from another file or format: already done
                workdir = store.workdir(key)
                for name in _OUTPUTS:
                    shutil.move(staging / name, workdir / name)
                report |= {
                    "fingerprint": fingerprint,
                    "quarantine_uri": store.uri(f"{key}/quarantine.jsonl"),
                    "report_uri": store.uri(f"{key}/report.json"),
                }
                (workdir / "report.json").write_text(json.dumps(store.as_keys(report), indent=2, sort_keys=True))
                # committed even when the run is about to fail: the quarantine must survive it
                store.commit(key)
            store.write_json(source_key, {"fingerprint": fingerprint})
    key = f"cache/data/{fingerprint}"
    report = store.as_uris(store.read_json(f"{key}/report.json"))
    _enforce(report, cfg.data)
    return ValidatedDataset(
        train_uri=store.uri(f"{key}/train.parquet"),
        eval_uri=store.uri(f"{key}/eval.parquet"),
        quarantine_uri=report["quarantine_uri"] if report["n_rejected"] else None,
        report_uri=report["report_uri"],
        n_input_rows=report["n_input_rows"],
        n_train=report["n_train"],
        n_eval=report["n_eval"],
        n_rejected=report["n_rejected"],
        # from this call's files: a cache hit may come from the same rows in another format
        source_format=sources[-1].fmt,
        fingerprint=fingerprint,
    )


# ---------------------------------------------------------------- Prefect wrapper


def _publish(report: dict) -> None:
    from prefect.artifacts import create_table_artifact
    from prefect.events import emit_event

    rows = [{"check": c, "rows": n, "meaning": CHECKS[c]} for c, n in report["checks"].items()]
    create_table_artifact(
        table=rows or [{"check": "-", "rows": 0, "meaning": "no rows rejected"}],
        key="data-validation",
        description=(
            f"{report['n_input_rows']} rows in, {report['n_train']} train, {report['n_eval']} eval, "
            f"{report['n_rejected']} quarantined ({report['n_truncated']} truncated). Report: {report['report_uri']}"
        ),
    )
    if report["n_rejected"]:
        emit_event(
            event="data.rejected",
            resource={"prefect.resource.id": f"qlora-flow.dataset.{report['fingerprint']}"},
            payload={
                "n_rejected": report["n_rejected"],
                "n_input_rows": report["n_input_rows"],
                "checks": report["checks"],
                "quarantine_uri": report["quarantine_uri"],
            },
        )


@task(name="validate-dataset", retries=2, retry_delay_seconds=10, retry_condition_fn=is_retryable, cache_policy=NO_CACHE)
def validate_dataset_task(cfg: PipelineConfig) -> ValidatedDataset:
    """Prefect wrapper; caching lives in the artifact store, keyed by the content fingerprint."""
    from qlora_flow.models import load_tokenizer_for

    store = open_store(cfg.execution)
    try:
        result = validate_dataset(cfg, store, load_tokenizer_for(cfg.base_model))
    except DataValidationError as exc:
        if exc.report is not None:
            _publish(exc.report)
        raise
    _publish(store.as_uris(store.read_json(store.key_of(result.report_uri))))
    return result
