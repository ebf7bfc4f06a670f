"""The bench's CPU-side scripts: wheel pruning, the README's generated tables, train_gpu.py's row handling."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import render_table, train_gpu


def test_prune_drops_image_packages_but_not_packages_whose_names_start_alike(tmp_path):
    names = [
        "jinja2-3.1.6-py3-none-any.whl",
        "jinja2_humanize_extension-0.4.0-py3-none-any.whl",
        "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl",
        "torchao-0.18.0-cp310-abi3-manylinux_2_28_x86_64.whl",
        "nvidia_cublas_cu12-12.4.5.8-py3-none-manylinux2014_x86_64.whl",
        "filelock-3.20.0-py3-none-any.whl",
        "prefect-3.4.0-py3-none-any.whl",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    subprocess.run(["bash", "bench/fetch_wheels.sh", "prune", str(tmp_path)], cwd=ROOT, check=True, timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "jinja2_humanize_extension-0.4.0-py3-none-any.whl",
        "prefect-3.4.0-py3-none-any.whl",
        "torchao-0.18.0-cp310-abi3-manylinux_2_28_x86_64.whl",
    ]


def test_readme_tables_are_what_the_committed_results_render():
    readme = render_table.README.read_text()
    assert render_table.update(readme, render_table.RESULTS) == readme
    table = render_table.render(render_table.files_for(["h200-run13"], render_table.RESULTS))
    ours = next(line for line in table.splitlines() if line.startswith("| h200, run13 | W1 | ours |"))
    # 14,362.6 tokens/s: 2.64x the seed recipe's 5,436.1 and 1.33x Unsloth's 10,759.4 in the same file
    assert "| 14,363 | 2.64x | 1.33x |" in ours and "| 1.141 (1.122-1.156), 10 |" in ours


def _row(profile, workload="W1", tokens=100.0, budget=None):
    return {"profile": profile, "workload": workload, "real_tokens_per_s": tokens, "memory_budget_gib": budget}


def test_ratios_pair_unsloth_by_workload_and_budget_and_seed_by_workload():
    rows = render_table.with_ratios(
        [
            _row("seed", tokens=50.0),
            _row("unsloth", tokens=100.0),
            _row("unsloth16", tokens=80.0, budget=16.0),
            _row("ours", tokens=150.0),
            _row("budget16", tokens=60.0, budget=16.0),
            _row("ours", "W2", 300.0),
        ]
    )
    by = {(r["workload"], r["profile"]): r for r in rows}
    assert by["W1", "ours"]["vs_unsloth"] == 1.5 and by["W1", "ours"]["vs_seed"] == 3.0
    assert by["W1", "budget16"]["vs_unsloth"] == 0.75 and by["W1", "budget16"]["vs_seed"] == 1.2
    assert "vs_unsloth" not in by["W2", "ours"] and "vs_seed" not in by["W2", "ours"]


def test_a_marker_naming_a_missing_run_is_an_error(tmp_path):
    text = "a\n<!-- perf-table:start runs=h200-run99 -->\nold\n<!-- perf-table:end -->\n"
    with pytest.raises(SystemExit, match="run 'h200-run99'"):
        render_table.update(text, tmp_path)


def test_profile_names_give_budget_and_family():
    assert [train_gpu.budget_of(p) for p in ("ours", "unsloth", "lowmem", "budget16", "unsloth7")] == [
        None,
        None,
        7.0,
        16.0,
        7.0,
    ]
    assert [train_gpu.family_of(p) for p in ("seed", "baseline+prof", "unsloth40", "budget40", "ours+ddp")] == [
        "seed",
        "baseline",
        "unsloth",
        "ours",
        "ours",
    ]


def _fake_child(tmp_path, fits_up_to: int) -> list[str]:
    """A child that reports its micro-batch and runs out of memory above `fits_up_to` rows."""
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, re, sys
        micro = int(re.search(r"micro(\\d+)", sys.argv[1]).group(1)) if "micro" in sys.argv[1] else 16
        print("SETTINGS " + json.dumps({{"micro_batch": micro}}), flush=True)
        if micro > {fits_up_to}:
            sys.exit("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
        print("RESULT " + json.dumps({{"profile": sys.argv[1], "micro_batch": micro, "real_tokens_per_s": 1.0}}))
    """)
    )
    return [sys.executable, str(script)]


@pytest.mark.parametrize(
    ("profile", "fits", "expected"),
    [
        ("unsloth7", 4, {"profile": "unsloth7", "micro_batch": 4, "out_of_memory_micro_batches": [16, 8]}),
        ("budget16", 4, {"profile": "budget16"}),  # ours is planned to fit: an out-of-memory failure is reported
    ],
)
def test_unsloth_rows_halve_the_micro_batch_after_running_out_of_memory(tmp_path, monkeypatch, profile, fits, expected):
    child = _fake_child(tmp_path, fits)
    monkeypatch.setattr(train_gpu, "_child_command", lambda args, workload, p: [*child, p])
    args = type("Args", (), {"shape": "tiny"})()
    result = train_gpu.measure(args, "W1", profile, deadline=float("inf"))
    assert {k: result[k] for k in expected} == expected
    assert ("error" in result) == (profile == "budget16")
    if profile == "budget16":
        assert "out of memory" in result["error"]


def test_a_row_past_the_deadline_is_killed_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(train_gpu, "_child_command", lambda *a: [sys.executable, "-c", "import time; time.sleep(30)"])
    args = type("Args", (), {"shape": "tiny"})()
    started = time.monotonic()
    result = train_gpu.measure(args, "W1", "ours", deadline=started + 1)
    assert result == {"shape": "tiny", "workload": "W1", "profile": "ours", "error": "time limit: row killed"}
    assert time.monotonic() - started < 10


def test_profile_header_counts_kernel_time_once(tmp_path, monkeypatch):
    """An operator's row repeats the time of the kernels it launched: the header's kernel time sums kernels only,
    so a 20% idle GPU reads as 80% of the wall, not the 240% the double count gave."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    class Events(list):
        def table(self, **options):
            return "the op table\n"

    events = Events(
        [
            SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=1_600_000),  # aten::mm
            SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=1_200_000),  # its kernels
            SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=400_000),
        ]
    )
    monkeypatch.setenv("OUT", str(tmp_path))
    args = SimpleNamespace(shape="tiny", workload="W1", profile="budget16+prof", warmup=1)
    train_gpu._write_profile(SimpleNamespace(key_averages=lambda: events), args, [9.0, 1.0, 1.0, 7.0])
    text = (tmp_path / "profile-tiny-W1-budget16_prof.txt").read_text()
    assert text.startswith("two steps, wall 2.000 s, kernel time 1.600 s = 80% of the wall")
    assert text.endswith("the op table\n")


def test_the_nf4_gpu_check_passes_where_the_torch_path_equals_bitsandbytes(monkeypatch):
    """bench/check_nf4.py, run here on the CPU at a small shape: eager bit-exact, compiled within the bound,
    NF4Matmul's output and input gradient close to bitsandbytes' matmul_4bit."""
    from bench import check_nf4

    monkeypatch.setattr(check_nf4, "SHAPES", [(64, 128)])
    (row,) = check_nf4.check("cpu", tokens=8)
    assert row["torch_path"] and row["eager_mismatches"] == 0 and row["ok"], row
    assert row["matmul_rel_error"] < 1e-2 and row["input_grad_rel_error"] < 1e-2
