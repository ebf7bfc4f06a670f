"""Shared fixtures: a tiny random-weight Llama with the real SmolLM2 tokenizer, small chat data, a temp store.

Everything runs offline on the CPU in seconds.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Prefect's console log handler keeps the stream that sys.stderr was when Prefect set up logging (importing
# prefect.main; a bare `import prefect` defers it). Do it here, under pytest's session-wide capture: done first
# inside a capsys test, the handler kept that test's stream, closed when the test ended, and every later flow's
# log line failed with RecursionError (test_console then test_flow_e2e).
import prefect.main  # noqa: F401

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "tokenizer"


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """`qlora_flow.cli.main` run in-process replaces the root logger's handlers with one bound to this test's
    (captured, soon closed) stderr; left there, every later flow's log line fails. Put back what was there."""
    import logging

    root = logging.getLogger()
    before, level = root.handlers[:], root.level
    yield
    ours = [h for h in before if not type(h).__module__.startswith("_pytest")]
    for handler in root.handlers[:]:
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    for handler in ours:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def build_tiny_model_dir(dest: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) saved in bf16 with the SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def make_chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Deterministic toy chat rows: the answer is a fixed JSON shape derived from the question."""
    rng = random.Random(seed)
    names = ["Ada", "Bob", "Cyd", "Dee", "Eve", "Fox", "Gus", "Hal"]
    rows = []
    for i in range(n):
        name, age = rng.choice(names), rng.randint(18, 90)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Record {i}: {name} is {age} years old."},
                    {"role": "assistant", "content": json.dumps({"name": name, "age": age})},
                ]
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_chat_rows(40)))
    return path


def tiny_overrides(home: Path, train_path: Path, model_dir: Path) -> dict[str, object]:
    """Config overrides that run every stage on the tiny model in a store under home, in seconds: the
    tiny_config fixture, and the UI and deployment-stack tests, which change a few keys on top."""
    return {
        "data.train_path": str(train_path),
        "data.eval_fraction": 0.2,
        "base_model.id": str(model_dir),
        "lora.r": 4,
        "lora.alpha": 8,
        "training.max_seq_length": 128,
        "training.max_steps": 6,
        "training.per_device_batch_size": 4,
        "training.save_steps": 2,
        "training.logging_steps": 1,
        "training.learning_rate": 1e-3,
        "evaluation.max_generation_samples": 4,
        "evaluation.max_new_tokens": 16,
        "evaluation.gate.min_loss_improvement": -100.0,
        "evaluation.gate.max_regression_vs_production": None,
        "merge.verify_prompts": 2,
        "execution.store": str(home / "store"),
        "execution.local_cache": str(home / "cache"),
        "execution.isolate_gpu_stages": False,
    }


def placeholder_refs():
    """(ValidatedDataset, PreparedBase) that name nothing real: for tests of fingerprints and locks, which
    read only their fields."""
    from qlora_flow.refs import PreparedBase, ValidatedDataset

    data = ValidatedDataset(
        train_uri="t",
        eval_uri="e",
        report_uri="r",
        n_input_rows=1,
        n_train=1,
        n_eval=1,
        n_rejected=0,
        source_format="messages",
        fingerprint="data-fp",
    )
    base = PreparedBase(
        model_id="m",
        architecture="LlamaForCausalLM",
        full_precision_uri="f",
        fingerprint="base-fp",
        compute_dtype="float32",
        device="cpu",
        parameters=1,
        footprint_bytes_16bit=2,
        load_seconds=0.0,
    )
    return data, base


def placeholder_adapter(uri: str = "a", seconds: float = 1.0):
    """An AdapterRef that names nothing real (one step of `seconds`), for tests that fake the training."""
    from qlora_flow.refs import AdapterRef

    return AdapterRef(
        uri=uri,
        checkpoint_uri="c",
        fingerprint="fp",
        trainable_parameters=1,
        steps=1,
        loss_history=[],
        tokens_seen=1,
        train_seconds=seconds,
        tokens_per_second=1.0 / seconds,
    )


CHROMIUM = Path("/usr/bin/chromium")  # Debian's, which .ci/run installs


def launch_chromium(playwright):
    """Headless Debian Chromium as the UI tests drive it (offline: no background networking)."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir, chat_jsonl):
    """A PipelineConfig that runs every stage on the tiny model in a temp store, in seconds."""
    from qlora_flow.config import load_config

    return load_config(None, tiny_overrides(tmp_path, chat_jsonl, tiny_model_dir))


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect server for the tests of one module."""
    from prefect.testing.utilities import prefect_test_harness

    # the temporary server's telemetry heartbeat only adds sqlite lock noise to test output
    previous = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    try:
        with prefect_test_harness(server_startup_timeout=60):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED")
        else:
            os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = previous
