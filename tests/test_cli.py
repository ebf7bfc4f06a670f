"""The CLI turns expected failures into one line and a non-zero exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_flow.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_bad_config_is_one_line_not_a_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lora:\n  r: -2\n")
    proc = _cli("run", str(cfg))
    assert proc.returncode == 2
    assert "error: invalid configuration" in proc.stderr and "lora.r" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_data_file_is_one_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  train_path: {tmp_path}/absent.jsonl\n")
    proc = _cli("validate", str(cfg))
    assert proc.returncode == 2
    assert f"{tmp_path}/absent.jsonl" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_override_syntax():
    proc = _cli("run", "configs/demo.yaml", "--set", "lora.r")
    assert proc.returncode == 2 and "expected KEY=VALUE" in proc.stderr


def test_validate_command_accepts_demo_data_and_rejects_bad_rows(tmp_path):
    import json

    store = tmp_path / "store"
    proc = _cli("validate", "configs/demo.yaml", "--set", f"execution.store={store}")
    assert proc.returncode == 0, proc.stderr
    assert "ok: 320 train + 50 eval rows accepted, 0 rejected" in proc.stdout

    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in (ROOT / "examples/demo/train.jsonl").read_text().splitlines()[:20]]
    rows[3]["messages"][2]["content"] = "   "
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _cli("validate", "configs/demo.yaml", "--set", f"data.train_path={bad}", "--set", f"execution.store={store}")
    assert proc.returncode == 1
    assert "bad.jsonl:4 messages[2].content [empty_content]" in proc.stderr
    assert "Traceback" not in proc.stderr
