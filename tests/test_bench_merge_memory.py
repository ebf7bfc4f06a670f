"""bench/merge_memory.py end to end on the CPU: builds the store, merges in a child process, reports one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_merge_is_measured_and_committed(tmp_path):
    cmd = [
        sys.executable,
        "bench/merge_memory.py",
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--root",
        str(tmp_path / "store"),
        "--prompts",
        "2",
        "--max-new-tokens",
        "8",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert json.loads((tmp_path / "merge_memory_tiny_cpu.json").read_text()) == result

    assert (result["shape"], result["device"], result["verify"]) == ("tiny", "cpu", True)
    assert result["model_16bit_gib"] > 0 and result["merge_wall_s"] > 0
    assert result["peak_rss_gib"] >= result["rss_after_imports_gib"] > 0
    assert result["rss_over_16bit"] == pytest.approx(result["peak_rss_gib"] / result["model_16bit_gib"], rel=0.05)
    assert result["gpu_peak_allocated_gib"] is None and result["gpu_peak_reserved_gib"] is None
    assert "error" not in result and result["shipped_dtype"] in {"bfloat16", "float32"}
    v = result["verification"]
    assert v["verified"] is True
    assert 0 < v["reloaded_max_abs_logit_diff"] < 1 and 0.9 <= v["reloaded_top1_agreement"] <= 1
    assert ("float32_fallback_reason" in v) == (result["shipped_dtype"] == "float32")

    # The merged model was committed in the store, its weights in the shipped dtype and changed by the adapter.
    merged = Path(result["merged_uri"])
    assert merged == tmp_path / "store/runs/bench-tiny-cpu/model" and (merged / "_COMPLETE").exists()
    assert json.loads((merged / "verification.json").read_text())["verified"] is True
    shards = sorted(merged.glob("*.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    with (
        safe_open(shards[0], "pt") as fh,
        safe_open(tmp_path / "store/cache/base/tiny/full/model.safetensors", "pt") as base,
    ):
        assert str(fh.get_tensor(name).dtype) == f"torch.{result['shipped_dtype']}"
        assert not fh.get_tensor(name).float().equal(base.get_tensor(name).float())
