"""Streaming readers for training data: JSONL, JSON, CSV, Parquet and `save_to_disk` directories.

Every reader yields chunks of RawRow so a million-row file never sits in memory at once. Bytes
are decoded with `surrogateescape`: a row with invalid UTF-8 still parses, and the contract's
`encoding` check rejects exactly that row instead of the whole file failing to decode. A UTF-8
byte-order mark (Windows editors, Excel) is skipped. JSON is read strictly: a key given twice in
one object is a parse error, not a silent choice of the last value.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qlora_flow.config import ConfigError, S3Settings
from qlora_flow.contracts import DataValidationError

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
# first bytes of files that no reader understands as they are, or that carry a misleading suffix:
# magic -> (what the file is, what to do)
_UNPACK = "decompress it first (compressed files are not read)"
_MAGIC = {
    b"\x1f\x8b": ("gzip-compressed", _UNPACK),
    b"BZh": ("bzip2-compressed", _UNPACK),
    b"\xfd7zXZ\x00": ("xz-compressed", _UNPACK),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", _UNPACK),
    b"PK\x03\x04": ("a zip archive", "an .xlsx workbook is one: export the sheet as CSV, or unzip the archive"),
    b"PAR1": ("a Parquet file", "give it a .parquet suffix"),
    # Windows PowerShell's `>` writes UTF-16: every row would fail to parse
    b"\xff\xfe": ("UTF-16 text", "save it as UTF-8"),
    b"\xfe\xff": ("UTF-16 text", "save it as UTF-8"),
}
_BOM = "\ufeff"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

# CSV cells hold whole conversations; the stdlib default (128 KiB) is too small for long chats
csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class RawRow:
    number: int  # 1-based: the line a row starts on for JSONL and CSV, record number for the other formats
    value: object  # the parsed row, or the raw text when it could not be parsed
    error: tuple[str, str] | None = None  # (check, message) when the row could not be parsed


def file_error(check: str, message: str) -> DataValidationError:
    return DataValidationError(f"dataset validation failed [{check}]: {message}", {check: 1})


def detect_format(path: Path, uri: str) -> str:
    if path.is_dir():
        if any((path / marker).exists() for marker in _HF_MARKERS):
            return "hf_disk"
        raise file_error("unknown_format", f"{uri} is a directory but not a `datasets` save_to_disk directory")
    fmt = _SUFFIXES.get(path.suffix.lower())
    with open(path, "rb") as fh:
        head = fh.read(8)
    kind, fix = next((found for magic, found in _MAGIC.items() if head.startswith(magic)), (None, None))
    if kind and not (fmt == "parquet" and kind == "a Parquet file"):
        raise file_error("unknown_format", f"{uri} is {kind}" + (f", not {fmt}" if fmt else "") + f"; {fix}")
    if fmt is None:
        raise file_error(
            "unknown_format",
            f"{uri}: cannot tell the format from the suffix {path.suffix!r}; use one of "
            f"{', '.join(sorted(_SUFFIXES))} or a save_to_disk directory",
        )
    return fmt


def iter_chunks(path: Path, fmt: str, uri: str, chunk_rows: int) -> Iterator[list[RawRow]]:
    readers = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "hf_disk": _hf_disk}
    chunk: list[RawRow] = []
    for row in readers[fmt](path, uri):
        chunk.append(row)
        if len(chunk) >= chunk_rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice in one object")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _loads(text: str) -> object:
    """Strict JSON: JSONDecodeError for bad syntax, ValueError for what parses but cannot be read."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply") from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise ValueError(f"a number has more than {sys.get_int_max_str_digits()} digits") from None
        raise


def json_type(value: object) -> str:
    """What a parsed JSON value is, in JSON's words (null, not NoneType)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _parse_json_row(number: int, text: str) -> RawRow:
    try:
        value = _loads(text)
    except json.JSONDecodeError as exc:
        return RawRow(number, text, ("parse", f"invalid JSON: {exc.msg} at column {exc.colno}"))
    except ValueError as exc:
        return RawRow(number, text, ("parse", f"invalid JSON: {exc}"))
    if not isinstance(value, dict):
        hint = " (JSON Lines holds one object per line; a file holding one array needs the suffix .json)"
        message = f"expected a JSON object, got {json_type(value)}" + (hint if isinstance(value, list) else "")
        return RawRow(number, value, ("row_type", message))
    return RawRow(number, value)


def _jsonl(path: Path, uri: str) -> Iterator[RawRow]:
    with open(path, "rb") as fh:
        first = True
        for number, line in enumerate(fh, start=1):
            text = line.decode("utf-8", "surrogateescape").strip()
            if not text:  # blank lines are separators, not rows
                continue
            row = _parse_json_row(number, text.removeprefix(_BOM) if first else text)
            if first and row.error and (text == "{" or text.startswith("[")):
                # pretty-printed JSON: every later line would be quarantined as a fragment
                what = "an object" if text == "{" else "an array (a file holding one array needs the suffix .json)"
                raise file_error(
                    "parse", f"{uri}:{number}: JSON Lines needs one object per line; this file starts {what}"
                )
            first = False
            yield row


def _json(path: Path, uri: str) -> Iterator[RawRow]:
    text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix(_BOM)
    if not text.strip():
        return
    try:
        value = _loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line saved as .json: read it as JSON Lines
            yield from _jsonl(path, uri)
            return
        raise file_error(
            "parse", f"{uri} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except ValueError as exc:
        raise file_error("parse", f"{uri} is not valid JSON: {exc}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise file_error("row_type", f"{uri} must hold a JSON array of objects, not {json_type(value)}")
    for number, item in enumerate(value, start=1):
        if isinstance(item, dict):
            yield RawRow(number, item)
        else:
            yield RawRow(number, item, ("row_type", f"expected a JSON object, got {json_type(item)}"))


def _line_breaks(record: dict) -> int:
    cells = [c for v in record.values() for c in (v if isinstance(v, list) else [v]) if isinstance(c, str)]
    return sum(len(_LINE_BREAK.findall(c)) for c in cells)


def _csv(path: Path, uri: str) -> Iterator[RawRow]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        # strict: a quote left open or text after a closing quote is an error, not a cell swallowing later rows
        reader = csv.DictReader(fh, strict=True)
        end = 0  # the line the previous record ended on
        try:
            header = reader.fieldnames or []
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise file_error("parse", f"{uri}:1: the header names the column {twice[0]!r} twice")
            end = reader.line_num
            for record in reader:
                # the line the record starts on (a quoted cell may span lines), as an editor shows it
                number = reader.line_num - _line_breaks(record)
                end = reader.line_num
                if None in record:  # DictReader files surplus cells under the key None
                    extra = record.pop(None)
                    yield RawRow(
                        number,
                        {**record, "_extra_cells": extra},
                        ("parse", f"row has more cells than the {len(record)} header columns"),
                    )
                    continue
                yield RawRow(number, record)
        except csv.Error as exc:
            # the reader cannot find where the next record starts, so the rest of the file is unreadable
            raise file_error(
                "parse",
                f"{uri}:{end + 1}: not valid CSV ({exc}): a quoted cell is never closed or has text after its closing quote",
            ) from None


def _parquet(path: Path, uri: str) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=10_000)
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield RawRow(number, record)
    except pa.ArrowInvalid as exc:
        raise file_error("parse", f"{uri} is not a readable Parquet file: {exc}") from None


def _hf_disk(path: Path, uri: str) -> Iterator[RawRow]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a missing, truncated or hand-edited file in it
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise file_error("parse", f"{uri} is not a readable `datasets` save_to_disk directory: {reason}") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise file_error("missing_columns", f"{uri} holds splits {sorted(dataset)} but no 'train' split")
        dataset = dataset["train"]
    number = 0
    for table in dataset.with_format("arrow").iter(batch_size=10_000):
        for record in table.to_pylist():
            number += 1
            yield RawRow(number, record)


@contextlib.contextmanager
def local_copy(uri: str, settings: S3Settings, field: str) -> Iterator[Path]:
    """A local path for uri: the path itself, or a temporary download of an s3:// object or prefix."""
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if not path.exists():
            raise ConfigError(f"data.{field}: {uri!r} does not exist (relative paths resolve from {Path.cwd()})")
        yield path
        return
    from botocore.exceptions import ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    prefix = key.rstrip("/") + "/"
    from qlora_flow.s3store import make_client  # the store's client: same credentials, retries and timeouts

    client = make_client(settings)
    with tempfile.TemporaryDirectory(prefix="qlora-flow-data-") as tmp:
        target = Path(tmp) / (key.rstrip("/").rsplit("/", 1)[-1] or bucket)
        try:
            # a save_to_disk directory is a prefix holding several objects; a file is one object
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
            for object_key in keys or [key]:
                dest = target / object_key[len(prefix) :] if keys else target
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, object_key, str(dest))
        except ClientError as exc:
            raise ConfigError(f"data.{field}: cannot read {uri}: {exc}") from None
        yield target
