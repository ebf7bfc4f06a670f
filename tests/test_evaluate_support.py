"""Shared inputs for the evaluate/merge tests: a perturbed LoRA adapter on the tiny model and hand-built refs.

Independent of the training stage: the adapter is made with peft directly and its lora_B weights set to
seeded noise, so it changes the model's outputs the way a trained adapter would.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlora_flow.refs import AdapterRef, LossPoint, PreparedBase, ValidatedDataset
from qlora_flow.store import LocalStore
from tests.conftest import make_chat_rows

N_EVAL = 6


def build_adapter_dir(
    model_dir: Path, dest: Path, target_modules: list[str], scale: float = 0.05, seed: int = 1
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dest)
    return dest


@dataclass
class RunInputs:
    store: LocalStore
    data: ValidatedDataset
    base: PreparedBase
    adapter: AdapterRef


def write_inputs(cfg, model_dir: Path, adapter_dir: Path) -> RunInputs:
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = LocalStore(cfg.execution.store)
    for key, source in (("cache/base/tiny/full", model_dir), ("cache/adapter/tiny/adapter", adapter_dir)):
        shutil.copytree(source, store.workdir(key), dirs_exist_ok=True)
        store.commit(key)
    data_dir = store.workdir("cache/data/tiny")
    for name, rows in (("train", make_chat_rows(16, seed=0)), ("eval", make_chat_rows(N_EVAL, seed=1))):
        pq.write_table(pa.Table.from_pylist(rows), data_dir / f"{name}.parquet")
    store.commit("cache/data/tiny")
    data = ValidatedDataset(
        train_uri=store.uri("cache/data/tiny/train.parquet"),
        eval_uri=store.uri("cache/data/tiny/eval.parquet"),
        report_uri=store.uri("cache/data/tiny/report.json"),
        n_input_rows=16 + N_EVAL,
        n_train=16,
        n_eval=N_EVAL,
        n_rejected=0,
        source_format="messages",
        fingerprint="data-fp",
    )
    base = PreparedBase(
        model_id=str(model_dir),
        architecture="LlamaForCausalLM",
        full_precision_uri=store.uri("cache/base/tiny/full"),
        fingerprint="base-fp",
        compute_dtype="float32",
        device="cpu",
        parameters=1,
        footprint_bytes_16bit=1,
        load_seconds=0.0,
    )
    adapter = AdapterRef(
        uri=store.uri("cache/adapter/tiny/adapter"),
        checkpoint_uri=store.uri("cache/adapter/tiny/checkpoints"),
        fingerprint="adapter-fp",
        trainable_parameters=123,
        steps=6,
        loss_history=[
            LossPoint(step=s, loss=3.0 - 0.2 * s, eval_loss=2.9 - 0.1 * s if s % 3 == 0 else None) for s in range(1, 7)
        ],
        tokens_seen=1000,
        train_seconds=1.0,
        tokens_per_second=1000.0,
    )
    return RunInputs(store, data, base, adapter)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from qlora_flow.config import ALL_PROJECTIONS

    return build_adapter_dir(tiny_model_dir, tmp_path_factory.mktemp("tiny-adapter"), ALL_PROJECTIONS)


@pytest.fixture
def run_inputs(tiny_config, tiny_model_dir, tiny_adapter_dir) -> RunInputs:
    return write_inputs(tiny_config, tiny_model_dir, tiny_adapter_dir)
