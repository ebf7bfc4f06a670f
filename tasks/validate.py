"""Stage 1: validate the training data and cut it into train/eval splits.

Reads every supported source in chunks, normalises the four data shapes to `messages`,
enforces the pandera contract (qlora_flow.contracts), drops duplicates and eval leakage, and
writes `train.parquet`, `eval.parquet`, `quarantine.jsonl` and `report.json` under
`cache/data/<fingerprint>/`. Every input row ends up in exactly one of train, eval or quarantine.

The fingerprint hashes every normalised row in sorted order (plus the settings that shape the
outputs), so the same conversations in another file format or order land on the same cache
entry. It is known only after the pass, so the pass writes into a staging directory; a small
pointer `cache/data-sources/<hash of the source bytes>.json` lets an unchanged file skip the
pass entirely. Pass/fail is re-derived from report.json on every call, so thresholds can change
without invalidating the cache. A cache hit reports the files of the run that produced it.
The settings include the hash of the validation code. After an edit to it, the first pass compares its
splits and quarantine with the entry an earlier version stored for the same files (qlora_flow.code_lineage,
"validation"): byte-identical, that entry and its fingerprint are kept (the pointer is rewritten), so the
adapter and everything trained on it stay cached.

Tool calls (OpenAI `tool_calls`/`tool` turns, ShareGPT `function_call`/`observation` turns) are
checked as turns of their own, then stored the way training sees them, as text any chat template
renders (SmolLM2's template knows only role and content): an assistant turn's calls follow its
text as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` blocks, and the tool results
after a call become one user turn of `<tool_response>\n...\n</tool_response>` blocks (Hermes /
Qwen2.5 convention). Call ids only serve the check that a result answers a call; they are dropped.
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
from qlora_flow.code_lineage import code_hashes, log_adoption
from qlora_flow.config import ConfigError, DataConfig, PipelineConfig
from qlora_flow.contracts import (
    CHECKS,
    INPUT_SCHEMAS,
    SHAPE_COLUMNS,
    SHAREGPT_ROLES,
    TURNS,
    DataValidationError,
    failures,
    mark_invalid_utf8,
)
from qlora_flow.errors import is_retryable
from qlora_flow.fingerprint import combine, hash_tree, sha256_file
from qlora_flow.layout import data_key, data_source_key
from qlora_flow.readers import RawRow
from qlora_flow.refs import ValidatedDataset
from qlora_flow.store import ArtifactStore, open_store

__all__ = ["DataValidationError", "validate_dataset", "validate_dataset_task"]

CHUNK_ROWS = 50_000
MAX_EXAMPLES = 5
_MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_SCHEMA = pa.schema([("messages", _MESSAGES_TYPE)])
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


def _arguments(value: object) -> object:
    """Call arguments as an object: OpenAI sends them as a JSON string, ShareGPT sets often as an object."""
    if isinstance(value, str):
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(value)
    return value


def _call(item: object, call_id: object = None) -> dict:
    item = item if isinstance(item, dict) else {"arguments": item}  # not an object: fails the tool_call check
    return {"id": call_id, "name": item.get("name"), "arguments": _arguments(item.get("arguments"))}


def _openai_calls(value: object) -> list[dict] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        return [_call(value)]
    return [
        _call(c.get("function") if isinstance(c, dict) else c, c.get("id") if isinstance(c, dict) else None)
        for c in value
    ]


def _sharegpt_calls(value: object) -> list[dict]:
    """A function_call turn's value: the JSON of one call or of a list of calls (parallel calls)."""
    parsed = _arguments(value)
    return [_call(item) for item in (parsed if isinstance(parsed, list) else [parsed])]


def _with_calls(text: object, calls: list[dict] | None) -> object:
    """The assistant turn as training sees it: its text, then one <tool_call> block per call."""
    if not calls or not (text is None or isinstance(text, str)):
        return text
    blocks = [
        "<tool_call>\n"
        + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in calls
    ]
    return "\n".join(([text.strip()] if text and text.strip() else []) + blocks)


def _turn(role: object, content: object, calls: list[dict] | None = None, call_id: object = None) -> dict:
    return {"role": role, "content": _with_calls(content, calls), "tool_calls": calls, "tool_call_id": call_id}


def _to_messages(shape: str, row: dict) -> Messages:
    if shape == "messages":
        return [
            _turn(t.get("role"), t.get("content"), _openai_calls(t.get("tool_calls")), t.get("tool_call_id"))
            for t in row["messages"]
        ]
    if shape == "sharegpt":
        turns = []
        for t in row["conversations"]:
            source = t.get("from")
            role = SHAREGPT_ROLES.get(source, source) if isinstance(source, str) else source
            calls = _sharegpt_calls(t.get("value")) if source == "function_call" else None
            turns.append(_turn(role, None if calls else t.get("value"), calls))
        return turns
    if shape == "prompt_completion":
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    context = row.get("input")
    prompt = (
        f"{row['instruction']}\n\n{context}" if isinstance(context, str) and context.strip() else row["instruction"]
    )
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
            if text_cells and shape in ("messages", "sharegpt"):
                column = SHAPE_COLUMNS[shape][0]
                records[i][column] = _decode_json_cell(records[i].get(column))
    cells = [{k: mark_invalid_utf8(v) for k, v in r.items()} for r in records.values()]
    # every schema column must exist in the frame, or a chunk lacking one would pass unchecked;
    # object dtype keeps values as read, so a type check sees an int as an int
    frame = pd.DataFrame(cells, index=list(records), columns=list(schema.columns), dtype=object)
    for case in failures(schema, frame):
        column = case.column
        got = f"got {_got(case.value)}"
        if column not in records[case.index]:  # absent, not null: say what the row has instead (mixed shapes)
            got = f"the row has no `{source_name.get(column, column)}`; its fields: {', '.join(map(str, rows[case.index].value))}"
        chunk.reject(case.index, case.check, source_name.get(column, column), f"{CHECKS[case.check]} ({got})")
    for i, record in records.items():
        if not chunk.reasons[i]:
            messages = _to_messages(shape, record)
            if data.system_prompt and messages[0].get("role") != "system":
                messages.insert(0, _turn("system", data.system_prompt))
            chunk.messages[i] = messages
    return chunk


# how a turn column is called in each chat shape, for quarantine reasons
_FIELD_NAMES = {
    "sharegpt": ("conversations", {"role": "from", "content": "value", "tool_calls": "value"}),
    "messages": ("messages", {}),
}
# frame-wide checks are about one field of the failing turn
_CHECK_FIELDS = {"tool_call_id": "tool_call_id"}


def _check_turns(chunk: _Chunk, shape: str) -> None:
    """The TURNS contract over every turn of the chunk, then tool turns folded into stored messages."""
    cols: dict[str, list] = {
        k: []
        for k in (
            "row",
            "turn",
            "n_turns",
            "role",
            "content",
            "tool_calls",
            "tool_call_id",
            "has_calls",
            "open_call_ids",
        )
    }
    for i, messages in enumerate(chunk.messages):
        open_ids: frozenset = frozenset()
        for t, turn in enumerate(messages or ()):
            calls = turn.get("tool_calls")
            cols["row"].append(i)
            cols["turn"].append(t)
            cols["n_turns"].append(len(messages))
            cols["role"].append(mark_invalid_utf8(turn["role"]))
            cols["content"].append(mark_invalid_utf8(turn["content"]))
            cols["tool_calls"].append(calls)
            cols["tool_call_id"].append(turn.get("tool_call_id"))
            cols["has_calls"].append(bool(calls))
            cols["open_call_ids"].append(open_ids)
            if turn["role"] != "tool":
                open_ids = frozenset(c.get("id") for c in calls if c.get("id") is not None) if calls else frozenset()
    turns = pd.DataFrame(
        {
            k: pd.Series(v, dtype="int64" if k in ("row", "turn", "n_turns") else bool if k == "has_calls" else object)
            for k, v in cols.items()
        }
    )
    prefix, names = _FIELD_NAMES.get(shape, ("messages", {}))
    for case in failures(TURNS, turns):
        turn = turns.loc[case.index]
        where = f"{prefix}[{turn['turn']}]"
        if case.column:
            field_name = names.get(case.column, case.column)
            chunk.reject(
                turn["row"], case.check, f"{where}.{field_name}", f"{CHECKS[case.check]} (got {_got(case.value)})"
            )
        else:
            field_name = names.get("role", "role") if case.check not in _CHECK_FIELDS else _CHECK_FIELDS[case.check]
            chunk.reject(
                turn["row"],
                case.check,
                f"{where}.{field_name}",
                f"{CHECKS[case.check]} (turn {turn['turn']} is {turn['role']!r})",
            )
    chunk.messages = [fold_tool_turns(m) if m is not None else None for m in chunk.messages]


def fold_tool_turns(turns: Messages) -> Messages:
    """Checked turns -> stored messages: role and content only, each run of tool results one user turn."""
    messages: Messages = []
    for i, turn in enumerate(turns):
        if turn["role"] != "tool":
            messages.append({"role": turn["role"], "content": turn["content"]})
            continue
        block = f"<tool_response>\n{turn['content']}\n</tool_response>"
        if i and turns[i - 1]["role"] == "tool":
            messages[-1]["content"] += "\n" + block
        else:
            messages.append({"role": "user", "content": block})
    return messages


# the blocks tool traffic is stored as (see the module docstring): our own text, not the user's tokens
_TOOL_MARKUP = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"}
# the text fields each non-chat shape becomes, by role of the turn
_TEXT_FIELDS = {
    "prompt_completion": {"user": "prompt", "assistant": "completion"},
    "instruction": {"user": "instruction/input", "assistant": "output"},
}


def template_tokens(tokenizer) -> list[str]:
    """Special tokens that the chat template writes or that end a sequence: inside a row's text they would be
    read as turn boundaries (a fake assistant turn, a loss mask in the wrong place)."""
    template = tokenizer.chat_template or ""
    ends = {tokenizer.eos_token, tokenizer.bos_token} - {None}
    return sorted({t for t in tokenizer.all_special_tokens if t in template or t in ends} - _TOOL_MARKUP)


def _check_special_tokens(chunk: _Chunk, shape: str, data: DataConfig, tokens: list[str]) -> None:
    prefix, names = _FIELD_NAMES.get(shape, ("messages", {}))
    for i, messages in enumerate(chunk.messages):
        for t, turn in enumerate(messages or ()):
            found = next((tok for tok in tokens if tok in turn["content"]), None)
            if found is None:
                continue
            if turn["role"] == "system" and turn["content"] == data.system_prompt:
                where = "data.system_prompt"
            else:
                where = _TEXT_FIELDS.get(shape, {}).get(
                    turn["role"], f"{prefix}[{t}].{names.get('content', 'content')}"
                )
            chunk.reject(i, "special_tokens", where, f"{CHECKS['special_tokens']} (found {found!r})")
            break


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


def _longest_token_bytes(tokenizer) -> int:
    """Most bytes one token of a byte-level BPE vocabulary covers (a vocabulary entry is one character
    per byte; an added token such as <|im_start|> is matched as its text)."""
    added = [len(t.encode("utf-8")) for t in tokenizer.get_added_vocab()]
    return max([len(t) for t in tokenizer.get_vocab()] + added)


@dataclass(frozen=True)
class _Lengths:
    tokenizer: object
    limit: int
    byte_bound: bool
    longest_token: int | None = None  # set (with byte_bound): a row this many bytes per limit token is over

    def count(self, conversations: list[Messages]) -> list[int]:
        """Tokens per rendered chat: exact where it may exceed the limit, else possibly an upper bound."""
        return [n for n, _ in self.measure(conversations, bound_over=False)]

    def measure(self, conversations: list[Messages], bound_over: bool = True) -> list[tuple[int, bool]]:
        """(tokens, exact) per rendered chat. bound_over: a chat with more than limit x longest_token bytes
        cannot fit, so it gets the lower bound bytes / longest_token instead of tokenising megabytes."""
        if not conversations:
            return []
        texts = self.tokenizer.apply_chat_template(conversations, tokenize=False)
        counts = [len(t.encode("utf-8")) for t in texts] if self.byte_bound else [self.limit + 1] * len(texts)
        result = [(n, True) for n in counts]
        unsure = []
        for i, n in enumerate(counts):
            if bound_over and self.byte_bound and self.longest_token and n > self.limit * self.longest_token:
                result[i] = (-(-n // self.longest_token), False)
            elif n > self.limit:
                unsure.append(i)
        if unsure:
            # apply_chat_template(tokenize=True) also encodes without extra special tokens: same count
            ids = self.tokenizer([texts[i] for i in unsure], add_special_tokens=False, return_attention_mask=False)[
                "input_ids"
            ]
            for i, row_ids in zip(unsure, ids):
                result[i] = (len(row_ids), True)
        return result

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
    # truncation cuts by the exact count; the other policies only need to know a row is over
    measured = lengths.measure([chunk.messages[i] for i in alive], bound_over=policy != "truncate")
    exact = {i: is_exact for i, (_, is_exact) in zip(alive, measured)}
    frame = pd.DataFrame({"n_tokens": [n for n, _ in measured]}, index=alive, dtype="int64")
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
            message = (
                f"{'' if exact[i] else 'at least '}{n} tokens > max_seq_length {limit} (overlength_policy={policy})"
            )
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


def _settings(cfg: PipelineConfig, tokenizer) -> list[str]:
    """Everything besides the rows that shapes the outputs; thresholds are left out on purpose. One per version
    of the validation code: today's first, then earlier ones (qlora_flow.code_lineage)."""
    split = (
        {"eval_file": True}
        if cfg.data.eval_path
        else {"eval_fraction": cfg.data.eval_fraction, "split_seed": cfg.data.split_seed}
    )
    lengths = {"max_seq_length": cfg.training.max_seq_length, "overlength_policy": cfg.data.overlength_policy}
    tokenizer_identity = _tokenizer_identity(tokenizer)
    return [combine(split, lengths, tokenizer_identity, code) for code in code_hashes("validation")]


def _source_keys(cfg: PipelineConfig, sources: list[_Source], settings: list[str]) -> list[str]:
    """Pointers from the exact source bytes (and the config reading them) to the content fingerprint, per settings."""
    files = [(s.split, hash_tree(s.path) if s.path.is_dir() else sha256_file(s.path)) for s in sources]
    reading = cfg.data.model_dump(include={"format", "column_mapping", "system_prompt"})
    return [data_source_key(combine(files, reading, one)) for one in settings]


def _earlier_entry(store: ArtifactStore, earlier_source_keys: list[str], staging: Path) -> str | None:
    """The fingerprint an earlier validation version stored for these sources, when its splits and quarantine
    are byte for byte what today's pass wrote to staging."""
    for source_key in earlier_source_keys:
        if not store.exists(source_key):
            continue
        fingerprint = store.read_json(source_key)["fingerprint"]
        stored = store.verified(data_key(fingerprint))
        if stored is not None and all(sha256_file(stored / n) == sha256_file(staging / n) for n in _OUTPUTS):
            return fingerprint
    return None


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
    byte_bound = _tokens_never_shorter_than_a_byte(tokenizer)
    longest = _longest_token_bytes(tokenizer) if byte_bound else None
    lengths = _Lengths(tokenizer, cfg.training.max_seq_length, byte_bound, longest)
    special = template_tokens(tokenizer)
    with ExitStack() as stack:
        writers = {
            s: stack.enter_context(pq.ParquetWriter(workdir / f"{s}.parquet", _SCHEMA)) for s in ("train", "eval")
        }
        quarantine = stack.enter_context(open(workdir / "quarantine.jsonl", "w", encoding="utf-8"))
        for source in sources:
            seen_exact: set[bytes] = set()
            seen_loose: set[bytes] = set()
            n_rows = 0
            shape = ""
            for shape, rows in _chunks(cfg, source):
                n_rows += len(rows)
                chunk = _normalise(cfg.data, shape, rows, text_cells=source.fmt == "csv")
                _check_turns(chunk, shape)
                _check_special_tokens(chunk, shape, cfg.data, special)
                # after folding, so the same conversations in any chat shape hash the same
                digests += [
                    _digest(source.split + "\x1d" + _canonical(m if m is not None else r.value))
                    for r, m in zip(chunk.rows, chunk.messages)
                ]
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
                        out["eval" if not cfg.data.eval_path and _in_eval(prompt, cfg.data) else "train"].append(
                            messages
                        )
                for split, kept in out.items():
                    if kept:
                        writers[split].write_table(pa.Table.from_pydict({"messages": kept}, schema=_SCHEMA))
                    totals[split] += len(kept)
                for row, reasons in zip(chunk.rows, chunk.reasons):
                    if not reasons:
                        continue
                    totals["rejected"] += 1
                    counts.update({r["check"] for r in reasons})
                    entry = {
                        "file": source.uri,
                        "split": source.split,
                        "row": row.number,
                        "raw": row.value,
                        "reasons": reasons,
                    }
                    quarantine.write(_canonical(entry) + "\n")
                    if len(examples) < MAX_EXAMPLES:
                        examples.append({"file": source.uri, "row": row.number, **reasons[0]})
            totals["input"] += n_rows
            per_source.append(
                {"file": source.uri, "split": source.split, "format": source.fmt, "shape": shape, "rows": n_rows}
            )
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
        "row_numbers": "1-based: the line a row starts on for JSONL and CSV, the record number for other formats",
    }


# ---------------------------------------------------------------- decision


def _example(e: dict) -> str:
    return f"{e['file']}:{e['row']} {e['field'] or '(row)'} [{e['check']}] {e['message']}"


def _split_source(report: dict, split: str, data: DataConfig) -> str:
    """Where a split's rows come from: its own file, or the seeded share of the train file."""
    files = {s["split"]: s["file"] for s in report["sources"]}
    if split in files:
        return f"{files[split]}: {split} split"
    return f"{files['train']}: eval split (data.eval_fraction {data.eval_fraction:g} of its rows)"


def _enforce(report: dict, data: DataConfig) -> None:
    """Raise DataValidationError when the report breaks the thresholds of the current config.

    The first line names the first offending row (file:row field [check]) or the split that came out
    too small, so the one `error:` line of the CLI says where to look; details follow, indented.
    """
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
            problems.append(
                f"{_split_source(report, split, data)} has {report[f'n_{split}']} rows, "
                f"data.min_{split}_rows is {minimum} [min_rows]"
            )
    if not problems:
        return
    examples = report["examples"]
    head = problems.pop(0)
    if "rejected_fraction" in verdicts and examples:
        head = f"{_example(examples[0])}; {head}"
    lines = [f"dataset validation failed: {head}", *(f"  {p}" for p in problems)]
    if report["checks"]:
        lines.append("  rejected rows per check:")
        lines += [f"    {check}: {n} ({CHECKS[check]})" for check, n in report["checks"].items()]
        lines.append(f"  first {len(examples)} offending rows:")
        lines += [f"    {_example(e)}" for e in examples]
    lines.append(f"  quarantine: {report['quarantine_uri']}  report: {report['report_uri']}")
    raise DataValidationError("\n".join(lines), report["checks"] | verdicts, report)


def _commit_pass(store: ArtifactStore, fingerprint: str, staging: Path, report: dict) -> None:
    key = data_key(fingerprint)
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


def validate_dataset(cfg: PipelineConfig, store: ArtifactStore, tokenizer) -> ValidatedDataset:
    with ExitStack() as stack:
        sources = _sources(cfg, stack)
        settings = _settings(cfg, tokenizer)
        source_key, *earlier_source_keys = _source_keys(cfg, sources, settings)
        fingerprint = store.read_json(source_key)["fingerprint"] if store.exists(source_key) else None
        if fingerprint is None or store.verified(data_key(fingerprint)) is None:
            # the fingerprint hashes every normalised row, so it is known only after the pass:
            # validate into a staging directory, then move the result under its key
            staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qlora-flow-validate-")))
            report = _validate_into(staging, cfg, sources, tokenizer)
            fingerprint = combine(report["content_hash"], settings[0])
            key = data_key(fingerprint)
            if store.verified(key) is None:  # else the same rows from another file or format: already done
                earlier = _earlier_entry(store, earlier_source_keys, staging)
                if earlier is not None:  # an earlier validation version stored exactly these files
                    log_adoption("data", earlier, fingerprint, store.uri(source_key))
                    fingerprint = earlier
                else:
                    _commit_pass(store, fingerprint, staging, report)
            store.write_json(source_key, {"fingerprint": fingerprint})
    key = data_key(fingerprint)
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


@task(
    name="validate-dataset", retries=2, retry_delay_seconds=10, retry_condition_fn=is_retryable, cache_policy=NO_CACHE
)
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
