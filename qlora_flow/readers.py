"""Streaming readers for training data: JSONL, JSON, CSV, Parquet and `save_to_disk` directories.

Every reader yields chunks of RawRow so a million-row file never sits in memory at once. Bytes
are decoded with `surrogateescape`: a row with invalid UTF-8 still parses, and the contract's
`encoding` check rejects exactly that row instead of the whole file failing to decode.
"""

from __future__ import annotations

import contextlib
import csv
import json
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

# CSV cells hold whole conversations; the stdlib default (128 KiB) is too small for long chats
csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class RawRow:
    number: int  # 1-based: line number for JSONL, record number for the other formats
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


def _parse_json_row(number: int, text: str) -> RawRow:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRow(number, text, ("parse", f"invalid JSON: {exc.msg} at column {exc.colno}"))
    if not isinstance(value, dict):
        return RawRow(number, value, ("row_type", f"expected a JSON object, got {type(value).__name__}"))
    return RawRow(number, value)


def _jsonl(path: Path, uri: str) -> Iterator[RawRow]:
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.decode("utf-8", "surrogateescape").strip()
            if text:  # blank lines are separators, not rows
                yield _parse_json_row(number, text)


def _json(path: Path, uri: str) -> Iterator[RawRow]:
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line saved as .json: read it as JSON Lines
            yield from _jsonl(path, uri)
            return
        raise file_error(
            "parse", f"{uri} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise file_error("row_type", f"{uri} must hold a JSON array of objects, not {type(value).__name__}")
    for number, item in enumerate(value, start=1):
        if isinstance(item, dict):
            yield RawRow(number, item)
        else:
            yield RawRow(number, item, ("row_type", f"expected a JSON object, got {type(item).__name__}"))


def _csv(path: Path, uri: str) -> Iterator[RawRow]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        for number, record in enumerate(reader, start=1):
            if None in record:  # DictReader files surplus cells under the key None
                extra = record.pop(None)
                yield RawRow(
                    number,
                    {**record, "_extra_cells": extra},
                    ("parse", f"row has more cells than the {len(record)} header columns"),
                )
                continue
            yield RawRow(number, record)


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

    dataset = load_from_disk(str(path))
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
