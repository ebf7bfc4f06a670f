"""Reading what earlier stages stored, for the stages after training (evaluate, merge, export).

Shared here rather than imported from one stage by another, so that each stage module stands alone.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from qlora_flow.models import load_tokenizer
from qlora_flow.store import ArtifactStore

Conversation = list[dict[str, str]]


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
