"""Training stage: trains on the NF4 base, caches by content, and survives SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_flow.refs import ValidatedDataset
from qlora_flow.store import LocalStore
from tasks.prepare_base import prepare_base_model
from tasks.train import (
    _TrainSpec,
    adapter_key,
    newest_complete_checkpoint,
    train_adapter,
    training_fingerprint,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _dataset(store: LocalStore, rows: list[dict], name: str = "d") -> ValidatedDataset:
    import pandas as pd

    from qlora_flow.fingerprint import combine

    key = f"cache/data/{name}"
    out = store.workdir(key)
    pd.DataFrame(rows).to_parquet(out / "train.parquet")
    pd.DataFrame(rows[:4]).to_parquet(out / "eval.parquet")
    store.commit(key)
    return ValidatedDataset(
        train_uri=store.uri(f"{key}/train.parquet"),
        eval_uri=store.uri(f"{key}/eval.parquet"),
        report_uri=store.uri(f"{key}/report.json"),
        n_input_rows=len(rows),
        n_train=len(rows),
        n_eval=4,
        n_rejected=0,
        source_format="messages",
        fingerprint=combine(rows),
    )


@pytest.fixture
def setup(tiny_config, tmp_path):
    from conftest import make_chat_rows

    cfg = tiny_config.model_copy(deep=True)
    cfg.training.max_steps = 8
    cfg.training.save_steps = 2
    cfg.lora.dropout = 0.1  # resumption must restore the RNG for dropout masks too
    store = LocalStore(cfg.execution.store)
    data = _dataset(store, make_chat_rows(48))
    base = prepare_base_model(cfg, store)
    return cfg, store, data, base


def _adapter_tensors(uri: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(uri) / "adapter_model.safetensors"))


def test_trains_lora_on_nf4_base_with_assistant_only_loss(setup):
    cfg, store, data, base = setup
    ref = train_adapter(cfg, store, data, base)

    assert base.nf4_uri is not None and base.compute_dtype == "float32"
    assert ref.steps == 8
    # r=4 on q,k,v,o (64->64 or 64->32) and gate/up/down (64<->128) in 2 layers
    per_layer = 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert ref.trainable_parameters == 2 * per_layer
    assert len(ref.loss_history) == 8 and all(p.loss > 0 for p in ref.loss_history)
    assert ref.tokens_seen > 0 and ref.tokens_per_second > 0
    config = json.loads((Path(ref.uri) / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == set(cfg.lora.target_modules)
    # lora_B starts at zero; training must have moved it
    assert any(t.abs().sum() > 0 for n, t in _adapter_tensors(ref.uri).items() if "lora_B" in n)
    # the saved tokenizer keeps the model's own chat template, not the training one with markers
    assert "{% generation %}" not in (Path(ref.uri) / "chat_template.jinja").read_text()
    complete = newest_complete_checkpoint(store, f"{adapter_key(ref.fingerprint)}/checkpoints")
    assert complete is not None and complete[0] == 8


def test_unchanged_request_reuses_adapter_and_changes_retrain(setup):
    cfg, store, data, base = setup
    first = train_adapter(cfg, store, data, base)
    started = time.perf_counter()
    again = train_adapter(cfg, store, data, base)
    assert again == first and time.perf_counter() - started < 1.0

    changed_hparam = cfg.model_copy(deep=True)
    changed_hparam.training.learning_rate = 5e-4
    assert training_fingerprint(changed_hparam, data, base) != first.fingerprint

    from conftest import make_chat_rows

    rows = make_chat_rows(48)
    rows[5]["messages"][1]["content"] += "!"
    changed_data = _dataset(store, rows, name="d2")
    assert training_fingerprint(cfg, changed_data, base) != first.fingerprint

    # settings that do not change the weights keep the cache
    cosmetic = cfg.model_copy(deep=True)
    cosmetic.training.logging_steps = 3
    cosmetic.training.offload = "on"
    cosmetic.training.compile = "off"
    cosmetic.training.gradient_checkpointing = "on"
    cosmetic.training.memory_budget_gib = 40
    assert training_fingerprint(cosmetic, data, base) == first.fingerprint

    # packing: auto packs on a GPU only, and a packed row holds several examples: another recipe there
    on_gpu = base.model_copy(update={"device": "cuda"})
    assert training_fingerprint(cfg, data, on_gpu) != first.fingerprint
    unpacked = cfg.model_copy(deep=True)
    unpacked.training.packing = "off"
    assert training_fingerprint(unpacked, data, on_gpu) == training_fingerprint(unpacked, data, base)


def test_packed_and_padded_epochs_count_the_same_tokens(setup):
    """A whole epoch sees every token once either way; padding-free packing has no padding to leave out,
    and the pad token here is also <|im_end|>, which "non_padding" counting would skip."""
    cfg, store, data, base = setup
    counts = []
    for packing in ("off", "on"):
        run = cfg.model_copy(deep=True)
        run.training.packing, run.training.max_steps, run.training.num_epochs = packing, -1, 1
        counts.append(train_adapter(run, store, data, base).tokens_seen)
    assert counts[0] > 0 and counts[1] == counts[0]


def _spawn_child(cfg, data, base, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    spec = tmp_path / "spec.json"
    result = tmp_path / "result.json"
    spec.write_text(_TrainSpec(config=cfg, data=data, base=base).model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.train", str(spec), str(result)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, result


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(setup, tmp_path):
    cfg, store, data, base = setup
    cfg.execution.isolate_gpu_stages = True
    checkpoints_key = f"{adapter_key(training_fingerprint(cfg, data, base))}/checkpoints"

    proc, _ = _spawn_child(cfg, data, base, tmp_path)
    deadline = time.monotonic() + 240
    while newest_complete_checkpoint(store, checkpoints_key) is None:
        assert proc.poll() is None, "training finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = newest_complete_checkpoint(store, checkpoints_key)[0]
    assert 2 <= killed_at < 8

    resumed = train_adapter(cfg, store, data, base)
    assert resumed.resumed_from_step is not None and resumed.resumed_from_step >= killed_at

    # the same request in a fresh store, never interrupted
    fresh = cfg.model_copy(deep=True)
    fresh.execution.store = str(tmp_path / "fresh-store")
    fresh_store = LocalStore(fresh.execution.store)
    fresh_data = _dataset(fresh_store, _rows_of(store, data))
    fresh_base = prepare_base_model(fresh, fresh_store)
    uninterrupted = train_adapter(fresh, fresh_store, fresh_data, fresh_base)

    assert uninterrupted.resumed_from_step is None
    assert [p.step for p in resumed.loss_history] == [p.step for p in uninterrupted.loss_history]
    for a, b in zip(resumed.loss_history, uninterrupted.loss_history):
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-5)
    got, want = _adapter_tensors(resumed.uri), _adapter_tensors(uninterrupted.uri)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def _rows_of(store: LocalStore, data: ValidatedDataset) -> list[dict]:
    import pandas as pd

    frame = pd.read_parquet(data.train_uri)
    return [{"messages": [dict(m) for m in msgs]} for msgs in frame["messages"]]


def test_incomplete_checkpoint_is_ignored(setup):
    cfg, store, data, base = setup
    checkpoints_key = f"{adapter_key(training_fingerprint(cfg, data, base))}/checkpoints"
    partial = store.workdir(f"{checkpoints_key}/checkpoint-6")
    (partial / "adapter_model.safetensors").write_bytes(b"truncated")
    assert newest_complete_checkpoint(store, checkpoints_key) is None
    ref = train_adapter(cfg, store, data, base)
    assert ref.resumed_from_step is None and ref.steps == 8


def test_timeout_kills_the_training_child_and_says_so(setup):
    from tasks.train import run_training_in_child

    cfg, store, data, base = setup
    cfg.execution.train_timeout_s = 2  # the child needs longer than this just to import torch
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="execution.train_timeout_s=2"):
        run_training_in_child(cfg, data, base, on_line=lines.append)
    assert time.monotonic() - started < 30
    # nothing was committed: no adapter, no checkpoint
    key = adapter_key(training_fingerprint(cfg, data, base))
    assert not store.is_complete(f"{key}/adapter")
    assert newest_complete_checkpoint(store, f"{key}/checkpoints") is None


def test_a_failing_training_child_raises_with_its_own_error_line(setup, tmp_path):
    from tasks.train import _child_failure, run_training_in_child

    cfg, store, data, base = setup
    Path(data.train_uri).unlink()  # the child cannot read the split it was given
    lines: list[str] = []
    with pytest.raises(RuntimeError) as failure:
        run_training_in_child(cfg, data, base, on_line=lines.append)
    message = str(failure.value)
    assert message.startswith("training failed: ") and "\n" not in message, message
    assert "train.parquet" in message and "exit code 1" in message, message
    assert any("Traceback" in line for line in lines)  # the child's traceback still reaches the log
    # no error line left (killed from outside): the signal is named
    assert "killed by SIGKILL" in _child_failure(-9, tmp_path / "result.json")
    assert (
        _child_failure(-40, tmp_path / "result.json") == "training process was killed by signal 40"
    )  # a real-time one
    assert _child_failure(3, tmp_path / "result.json") == "training process exited with code 3; see the log lines above"


@pytest.mark.slow
@pytest.mark.parametrize("compile_layers", ["off", "on"])
def test_two_rank_ddp_child_trains_the_same_global_batch_as_one_process(setup, tmp_path, compile_layers):
    """The command the stage runs for execution.gpus > 1 (torchrun + `-m tasks.train`), here on the CPU with
    gloo: rank 0 alone commits checkpoints and the adapter, and a step sees the same examples as one process.
    With compile on (the GPU default), the compiled decoder layers run inside DDP."""
    import shutil

    cfg, store, data, base = setup
    cfg.training.max_steps = 4
    cfg.lora.dropout = 0.0  # no dropout masks, whose random draws differ per rank
    single = train_adapter(cfg, store, data, base)
    key = adapter_key(single.fingerprint)
    shutil.rmtree(store.path / key)

    cfg.training.compile = compile_layers  # not in the fingerprint: the same adapter key as `single`
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(_TrainSpec(config=cfg, data=data, base=base).model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tasks.train",
        str(spec),
        str(result),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count(f"'compile_layers': {compile_layers == 'on'}") == 2, (
        proc.stdout[-2000:] + proc.stderr[-2000:]
    )  # each rank's logged plan

    ddp = json.loads(result.read_text())
    assert ddp["fingerprint"] == single.fingerprint and ddp["steps"] == 4
    # the Trainer gathers token counts over ranks: 2 ranks x half the batch = the same tokens per step
    assert ddp["tokens_seen"] == single.tokens_seen
    assert store.is_complete(f"{key}/adapter") and newest_complete_checkpoint(store, f"{key}/checkpoints")[0] == 4
    # rank 0 commits after every rank saved: the marker records both ranks' RNG states, and they verify
    listing = json.loads((store.path / key / "checkpoints/checkpoint-4/_COMPLETE").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= listing.keys()
    assert store.verified(f"{key}/checkpoints/checkpoint-4") is not None
    first_loss = [p["loss"] for p in ddp["loss_history"]][0]
    assert first_loss == pytest.approx(single.loss_history[0].loss, rel=0.05)
