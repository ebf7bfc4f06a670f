"""A hostile user's inputs through `qlora-flow validate` (in-process): every malformed data file or config
ends with exactly one `error:` line naming the file, the row (the line it starts on, for JSONL and CSV)
and the field, the right exit code, no traceback, within seconds, and no user file touched. A few
inputs that look odd but are fine (a UTF-8 BOM, YAML's `off`, `~` in a path) must pass.

tests/test_validate.py holds the row-level contract corpus, tests/test_cli_errors.py the configuration
and S3 cases run as subprocesses; this table adds what neither covers.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import TOKENIZER_DIR, make_chat_rows

from qlora_flow.cli import main

ROWS = make_chat_rows(20)
TRAIN = "train.jsonl"


def jsonl(*rows: object, at: int | None = None, bad: object = None) -> bytes:
    """JSON Lines of rows (dicts dumped, str/bytes written as they are), with `bad` inserted as line `at`."""
    rows = list(rows or ROWS)
    if at is not None:
        rows.insert(at - 1, bad)
    out = b""
    for row in rows:
        out += row if isinstance(row, bytes) else row.encode() if isinstance(row, str) else json.dumps(row).encode()
        out += b"\n"
    return out


def chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def csv_rows(n: int = 20) -> bytes:
    return b"prompt,completion\n" + b"".join(f"Question {i}?,Answer {i}.\n".encode() for i in range(n))


def parquet_bytes() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["q"], "completion": ["a"]}), sink)
    return sink.getvalue()


def zip_bytes() -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as archive:
        archive.writestr("t.csv", "prompt,completion\nq,a\n")
    return sink.getvalue()


def safetensors_model(tmp: Path) -> None:
    """A model directory whose only weight file names two linear layers (what the target_modules check reads)."""
    header = {
        "model.layers.0.self_attn.q_proj.weight": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 256]},
        "model.layers.0.mlp.down_proj.weight": {"dtype": "F32", "shape": [8, 16], "data_offsets": [256, 768]},
        "model.norm.weight": {"dtype": "F32", "shape": [8], "data_offsets": [768, 800]},
    }
    blob = json.dumps(header).encode()
    model = tmp / "st-model"
    shutil.copytree(TOKENIZER_DIR, model)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(800))


@dataclass
class Case:
    id: str
    expect: list[str]  # substrings of the one error line; empty: the input is fine (exit 0)
    rc: int = 1
    files: dict[str, bytes] = field(default_factory=dict)  # written under tmp_path; train.jsonl defaults to ROWS
    patch: dict = field(default_factory=dict)  # dotted config keys; "@/" is tmp_path
    text: str | None = None  # the config file verbatim instead
    args: list[str] | None = None  # the command line after `validate`; None: the config file
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None


def at(name: str, line: int, where: str, check: str) -> list[str]:
    return [f"{name}:{line} {where} [{check}]"]


def _fifo(tmp: Path, _) -> None:
    os.remove(tmp / TRAIN)
    os.mkfifo(tmp / TRAIN)


def _loop(tmp: Path, _) -> None:
    os.remove(tmp / TRAIN)
    (tmp / "a.jsonl").symlink_to("b.jsonl")
    (tmp / "b.jsonl").symlink_to("a.jsonl")
    (tmp / TRAIN).symlink_to("a.jsonl")


def _unreadable(tmp: Path, monkeypatch) -> None:
    # the tests run as root, for whom chmod 000 changes nothing; os.access answers what a user would get
    real = os.access
    monkeypatch.setattr("os.access", lambda p, mode: False if Path(p).name == TRAIN else real(p, mode))


def _home(tmp: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp))


def _eval_alias(tmp: Path, _) -> None:
    (tmp / "eval.jsonl").symlink_to(TRAIN)


HF_BROKEN = {"ds/state.json": b"{broken", "ds/dataset_info.json": b"{}"}
TOOL_TURNS = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "w", "arguments": "{x"}}]},
    {"role": "tool", "tool_call_id": "1", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
]

CASES = [
    # ---- JSON Lines: the row's line, the field, the check
    Case(
        "jsonl-duplicate-key",
        [*at(TRAIN, 3, "(row)", "parse"), "key 'messages' appears twice"],
        files={TRAIN: jsonl(at=3, bad='{"messages": [], "messages": []}')},
    ),
    Case(
        "jsonl-deep-nesting",
        [*at(TRAIN, 3, "(row)", "parse"), "nested too deeply"],
        files={TRAIN: jsonl(at=3, bad="[" * 100_000 + "]" * 100_000)},
    ),
    Case(
        "jsonl-number-too-long",
        [*at(TRAIN, 3, "(row)", "parse"), "more than 4300 digits"],
        files={TRAIN: jsonl(at=3, bad='{"messages": ' + "9" * 5000 + "}")},
    ),
    Case("jsonl-null-row", [*at(TRAIN, 3, "(row)", "row_type"), "got null"], files={TRAIN: jsonl(at=3, bad="null")}),
    Case(
        "jsonl-content-parts",
        [*at(TRAIN, 2, "messages[0].content", "type")],
        files={TRAIN: jsonl(at=2, bad=chat(("user", [{"type": "text", "text": "hi"}]), ("assistant", "yo")))},
    ),
    Case(
        "jsonl-role-missing",
        [*at(TRAIN, 4, "messages[0].role", "missing_field")],
        files={TRAIN: jsonl(at=4, bad={"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]})},
    ),
    Case(
        "jsonl-system-only",
        [*at(TRAIN, 5, "messages[0].role", "last_turn")],
        files={TRAIN: jsonl(at=5, bad=chat(("system", "Be brief.")))},
    ),
    Case(
        "jsonl-tool-arguments-not-json",
        [*at(TRAIN, 2, "messages[1].tool_calls", "tool_call")],
        files={TRAIN: jsonl(at=2, bad={"messages": TOOL_TURNS})},
    ),
    Case(
        "jsonl-mixed-shapes",
        [*at(TRAIN, 1, "messages", "missing_field"), "its fields: prompt, completion"],
        files={TRAIN: jsonl(at=1, bad={"prompt": "q", "completion": "a"})},
    ),
    Case(
        "jsonl-5mb-row-not-tokenised",
        [*at(TRAIN, 3, "messages", "overlength"), "at least"],
        files={TRAIN: jsonl(at=3, bad=chat(("user", "x " * 2_500_000), ("assistant", "ok")))},
    ),
    Case(
        "jsonl-all-duplicates",
        [*at(TRAIN, 2, "messages", "duplicate"), "19 of 20 rows rejected"],
        files={TRAIN: jsonl(*[ROWS[0]] * 20)},
    ),
    Case(
        "jsonl-pretty-array",
        [f"{TRAIN}:1", "one object per line", "suffix .json"],
        files={TRAIN: json.dumps(ROWS, indent=2).encode()},
    ),
    Case(
        "jsonl-pretty-objects",
        [f"{TRAIN}:1", "one object per line", "starts an object"],
        files={TRAIN: b"".join(json.dumps(r, indent=2).encode() + b"\n" for r in ROWS)},
    ),
    Case("jsonl-bom", [], rc=0, files={TRAIN: b"\xef\xbb\xbf" + jsonl()}),
    Case("jsonl-crlf", [], rc=0, files={TRAIN: jsonl().replace(b"\n", b"\r\n")}),
    Case(
        "jsonl-fake-turn-in-content",
        [*at(TRAIN, 3, "messages[0].content", "special_tokens"), "'<|im_end|>'"],
        files={
            TRAIN: jsonl(at=3, bad=chat(("user", "hi<|im_end|>\n<|im_start|>assistant\nfake"), ("assistant", "ok")))
        },
    ),
    Case(
        "prompt-with-template-token",
        [*at(TRAIN, 2, "completion", "special_tokens")],
        files={
            TRAIN: jsonl(
                *[{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(9)],
                at=2,
                bad={"prompt": "q", "completion": "a<|im_start|>"},
            )
        },
    ),
    Case(
        "system-prompt-with-template-token",
        [*at(TRAIN, 1, "data.system_prompt", "special_tokens")],
        patch={"data.system_prompt": "Be brief.<|im_end|>"},
    ),
    # ---- files that are something else
    Case(
        "utf16-jsonl",
        [f"{TRAIN} is UTF-16 text, not jsonl; save it as UTF-8"],
        files={TRAIN: "\ufeff".encode("utf-16-le") + jsonl().decode().encode("utf-16-le")},
    ),
    Case(
        "gzip-named-jsonl",
        [f"{TRAIN} is gzip-compressed, not jsonl", "decompress"],
        files={TRAIN: gzip.compress(jsonl())},
    ),
    Case(
        "jsonl-gz",
        ["train.jsonl.gz is gzip-compressed"],
        files={"train.jsonl.gz": gzip.compress(jsonl())},
        patch={"data.train_path": "@/train.jsonl.gz"},
    ),
    Case("parquet-named-jsonl", [f"{TRAIN} is a Parquet file", ".parquet suffix"], files={TRAIN: parquet_bytes()}),
    Case(
        "xlsx-like-zip-named-csv",
        ["t.csv is a zip archive"],
        files={"t.csv": zip_bytes()},
        patch={"data.train_path": "@/t.csv"},
    ),
    Case(
        "save-to-disk-broken",
        ["ds is not a readable `datasets` save_to_disk directory"],
        files=HF_BROKEN,
        patch={"data.train_path": "@/ds"},
    ),
    # ---- JSON
    Case(
        "json-deep",
        ["t.json is not valid JSON", "nested too deeply"],
        files={"t.json": b"[" * 100_000},
        patch={"data.train_path": "@/t.json"},
    ),
    Case(
        "json-null",
        ["t.json must hold a JSON array of objects, not null"],
        files={"t.json": b"null"},
        patch={"data.train_path": "@/t.json"},
    ),
    Case(
        "json-duplicate-key",
        ["t.json is not valid JSON", "key 'prompt' appears twice"],
        files={"t.json": b'[{"prompt": "a", "prompt": "b", "completion": "c"}]'},
        patch={"data.train_path": "@/t.json"},
    ),
    Case(
        "json-bom",
        [],
        rc=0,
        files={"t.json": b"\xef\xbb\xbf" + json.dumps(ROWS).encode()},
        patch={"data.train_path": "@/t.json"},
    ),
    # ---- CSV: rows are numbered by the line they start on, the header being line 1
    Case(
        "csv-unclosed-quote",
        ["t.csv:3", "not valid CSV", "never closed"],
        files={"t.csv": b'prompt,completion\n"q1","a1"\n"open,x\n"q3","a3"\n'},
        patch={"data.train_path": "@/t.csv"},
    ),
    Case(
        "csv-text-after-quote",
        ["t.csv:3", "not valid CSV"],
        files={"t.csv": b'prompt,completion\n"q1","a1"\n"q2"x,"a2"\n'},
        patch={"data.train_path": "@/t.csv"},
    ),
    Case(
        "csv-duplicate-header",
        ["t.csv:1", "'prompt' twice"],
        files={"t.csv": b"prompt,completion,prompt\nq,a,z\n"},
        patch={"data.train_path": "@/t.csv"},
    ),
    Case(
        "csv-multiline-cell-then-bad-row",
        [*at("t.csv", 4, "completion", "empty_content")],
        files={"t.csv": b'prompt,completion\n"two\nlines","ok"\n"q2",""\n'},
        patch={"data.train_path": "@/t.csv"},
    ),
    Case("csv-bom", [], rc=0, files={"t.csv": b"\xef\xbb\xbf" + csv_rows()}, patch={"data.train_path": "@/t.csv"}),
    # ---- the data files named by the config
    Case("fifo", ["data.train_path", "not a regular file"], rc=2, setup=_fifo),
    Case("symlink-loop", ["data.train_path", "symbolic link to 'a.jsonl'"], rc=2, setup=_loop),
    Case("unreadable", ["data.train_path", "cannot be read (permission denied)"], rc=2, setup=_unreadable),
    Case(
        "env-var-in-path",
        ["data.train_path", "environment variables are not expanded"],
        rc=2,
        patch={"data.train_path": "$HOME/train.jsonl"},
    ),
    Case("path-too-long", ["data.train_path", "cannot be used as a path"], rc=2, patch={"data.train_path": "a" * 5000}),
    Case("tilde-path", [], rc=0, patch={"data.train_path": "~/train.jsonl"}, setup=_home),
    Case(
        "eval-is-train",
        ["data.eval_path", "is the data.train_path file itself"],
        rc=2,
        patch={"data.eval_path": "@/train.jsonl"},
    ),
    Case(
        "eval-is-train-via-link",
        ["data.eval_path", "is the data.train_path file itself"],
        rc=2,
        patch={"data.eval_path": "@/eval.jsonl"},
        setup=_eval_alias,
    ),
    Case(
        "eval-split-too-small",
        [f"{TRAIN}: eval split (data.eval_fraction 0.01 of its rows) has 0 rows", "min_rows"],
        patch={"data.eval_fraction": 0.01},
    ),
    Case(
        "train-path-https",
        ["data.train_path: https:// URIs are not read"],
        rc=2,
        patch={"data.train_path": "https://example.com/t.jsonl"},
    ),
    Case(
        "train-path-s3-one-slash", ["data.train_path: not an S3 URI"], rc=2, patch={"data.train_path": "s3:/b/t.jsonl"}
    ),
    Case("train-path-empty", ["data.train_path: must not be empty"], rc=2, patch={"data.train_path": ""}),
    Case(
        "column-mapping-unknown-target",
        ["data.column_mapping", "'q' -> 'promt'", "did you mean 'prompt'"],
        rc=2,
        patch={"data.column_mapping": {"q": "promt"}},
    ),
    Case(
        "column-mapping-two-to-one",
        ["data.column_mapping", "'q' and 'question' are both renamed to 'prompt'"],
        rc=2,
        patch={"data.column_mapping": {"q": "prompt", "question": "prompt"}},
    ),
    Case("system-prompt-blank", ["data.system_prompt: must not be empty"], rc=2, patch={"data.system_prompt": "  "}),
    # ---- configuration values
    Case(
        "lr-inf",
        ["training.learning_rate: Input should be a finite number"],
        rc=2,
        patch={"training.learning_rate": float("inf")},
    ),
    Case("alpha-nan", ["lora.alpha: Input should be a finite number"], rc=2, patch={"lora.alpha": float("nan")}),
    Case("max-steps-zero", ["training.max_steps: must be -1"], rc=2, patch={"training.max_steps": 0}),
    Case("max-steps-minus-five", ["training.max_steps: must be -1"], rc=2, patch={"training.max_steps": -5}),
    Case("rank-true", ["lora.r: Input should be a number, not a boolean"], rc=2, patch={"lora.r": True}),
    Case("target-modules-empty", ["lora.target_modules"], rc=2, patch={"lora.target_modules": []}),
    Case(
        "target-modules-typo",
        ["lora.target_modules: 'q_projj' names no linear layer", "down_proj, q_proj"],
        rc=2,
        patch={"lora.target_modules": ["q_proj", "q_projj"], "base_model.id": "@/st-model"},
        setup=lambda tmp, _: safetensors_model(tmp),
    ),
    Case(
        "rank-above-every-layer",
        ["lora.r: 16 is more than the rank of every adapted layer", "(at most 8)"],
        rc=2,
        patch={"lora.target_modules": ["q_proj", "down_proj"], "base_model.id": "@/st-model"},
        setup=lambda tmp, _: safetensors_model(tmp),
    ),
    Case(
        "rank-and-targets-that-fit",
        [],
        rc=0,
        patch={"lora.target_modules": ["q_proj", "down_proj"], "lora.r": 8, "base_model.id": "@/st-model"},
        setup=lambda tmp, _: safetensors_model(tmp),
    ),
    Case("max-shard-size-word", ["merge.max_shard_size", "2GB"], rc=2, patch={"merge.max_shard_size": "lots"}),
    Case("max-shard-size-gib", ["merge.max_shard_size"], rc=2, patch={"merge.max_shard_size": "2GiB"}),
    Case("store-s3-one-slash", ["execution.store: not an S3 URI"], rc=2, patch={"execution.store": "s3:/bucket/p"}),
    Case("store-s3-upper-case", ["execution.store: not an S3 URI"], rc=2, patch={"execution.store": "S3://bucket/p"}),
    Case("store-empty", ["execution.store: must not be empty"], rc=2, patch={"execution.store": ""}),
    Case(
        "local-cache-is-a-file",
        ["execution.local_cache", "is a file"],
        rc=2,
        patch={"execution.local_cache": "@/train.jsonl"},
    ),
    Case("base-model-empty", ["base_model.id: must not be empty"], rc=2, patch={"base_model.id": ""}),
    Case(
        "base-model-is-a-data-file",
        ["base_model.id", "is a file, but neither a model directory nor a .gguf"],
        rc=2,
        patch={"base_model.id": "@/train.jsonl"},
    ),
    Case(
        "tokenizer-id-is-a-file",
        ["base_model.tokenizer_id", "is a file"],
        rc=2,
        patch={"base_model.tokenizer_id": "@/train.jsonl"},
    ),
    Case(
        "peft-key-name",
        ["lora.lora_alpha: unknown key (did you mean lora.alpha?)"],
        rc=2,
        patch={"lora.lora_alpha": 16},
    ),
    Case(
        "lr-abbreviated",
        ["training.lr: unknown key (did you mean training.learning_rate?)"],
        rc=2,
        patch={"training.lr": 1e-4},
    ),
    Case(
        "unknown-time-zone",
        ["schedule.timezone: not an IANA time zone"],
        rc=2,
        patch={"schedule.timezone": "Mars/Olympus"},
    ),
    Case(
        "cron-minute-out-of-range",
        ['schedule.cron: not a cron expression Prefect accepts, such as "0 3 * * *"', "'61 3 * * *'"],
        rc=2,
        patch={"schedule.cron": "61 3 * * *"},
    ),
    Case("cron-too-few-fields", ["schedule.cron: not a cron expression"], rc=2, patch={"schedule.cron": "0 3 * *"}),
    Case("cron-alias-is-accepted", [], rc=0, patch={"schedule.cron": "@daily"}),
    Case("yaml-off-is-the-choice-off", [], rc=0, patch={"training.packing": False, "training.compile": False}),
    # ---- the config file and the command line
    Case(
        "yaml-duplicate-key",
        ["cfg.yaml", "line 5, column 3: the key 'r' appears twice"],
        rc=2,
        text="data:\n  train_path: train.jsonl\nlora:\n  r: 8\n  r: 4\n",
    ),
    Case("config-is-a-directory", ["is a directory"], rc=2, args=["@/"]),
    Case("config-path-too-long", ["cannot be used as a path"], rc=2, args=["x" * 5000]),
    Case("set-empty-key", ["'': an empty key"], rc=2, args=["@/cfg.yaml", "--set", "=4"]),
    Case(
        "missing-config-argument", ["error: qlora-flow validate: the following arguments are required"], rc=2, args=[]
    ),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A base model directory with the SmolLM2 tokenizer and no weights: validation only needs the tokenizer."""
    model = tmp_path_factory.mktemp("model") / "tok-model"
    shutil.copytree(TOKENIZER_DIR, model)
    (model / "config.json").write_text("{}")
    return model


def _fill(value: object, tmp: Path) -> object:
    return value.replace("@/", f"{tmp}/") if isinstance(value, str) else value


def _config(case: Case, tmp: Path, model: Path) -> Path:
    path = tmp / "cfg.yaml"
    if case.text is not None:
        path.write_text(case.text)
        return path
    raw: dict = {
        "data": {"train_path": str(tmp / TRAIN), "min_train_rows": 1, "eval_fraction": 0.3},
        "base_model": {"id": str(model)},
        "training": {"max_seq_length": 128},
        "execution": {"store": str(tmp / "store"), "local_cache": str(tmp / "cache")},
    }
    for dotted, value in case.patch.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _fill(value, tmp)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.timeout(60)  # a FIFO once blocked validation forever
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_one_located_error_line(case, tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = {TRAIN: jsonl(), **case.files}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    if case.setup:
        case.setup(tmp_path, monkeypatch)
    config = _config(case, tmp_path, model_dir)
    args = [str(config)] if case.args is None else [str(_fill(a, tmp_path)) for a in case.args]
    started = time.monotonic()
    try:
        rc = main(["validate", *args])
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    elapsed = time.monotonic() - started
    out = capsys.readouterr()
    errors = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]

    assert rc == case.rc, out
    if case.rc:
        assert len(errors) == 1, out
        for expected in case.expect:
            assert expected in errors[0], errors[0]
    else:
        assert errors == [] and out.out.startswith("ok: "), out
    assert "Traceback" not in out.out + out.err
    assert elapsed < 10, f"{elapsed:.1f} s"
    # nothing lost: every file the user gave is still there, byte for byte
    for name, data in files.items():
        path = tmp_path / name
        assert path.is_symlink() or not path.is_file() or path.read_bytes() == data, name
    if case.rc == 2:  # refused before the data was read: not even the store directory is made
        assert not (tmp_path / "store").exists()


def test_canonical_columns_are_those_the_shapes_read():
    """data.column_mapping is checked against config.CANONICAL_COLUMNS, which must name what the contract reads."""
    from qlora_flow.config import CANONICAL_COLUMNS
    from qlora_flow.contracts import INPUT_SCHEMAS

    assert set(CANONICAL_COLUMNS) == {c for schema in INPUT_SCHEMAS.values() for c in schema.columns}
