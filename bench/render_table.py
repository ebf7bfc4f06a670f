"""The README's performance tables, generated from the raw JSON lines in bench/results/.

    python bench/render_table.py            # rewrite every marked table in README.md
    python bench/render_table.py --check    # exit 1 if README.md is not what the results give

A table sits between `<!-- perf-table:start runs=h200-run13,h200-run14 -->` and `<!-- perf-table:end -->`;
`runs` names the invocations it shows as <host>-run<N>, matched against result files named
<host>-<shape>-run<N>[-<label>].jsonl. Ratios only ever compare rows of one file (one invocation on one
machine): "vs seed" against that file's seed-recipe row of the same workload, "vs Unsloth" against its
Unsloth row of the same workload and memory budget, "vs baseline" against its baseline row.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START = re.compile(r"<!-- perf-table:start runs=(?P<runs>[\w.,-]+) -->\n")
END = "<!-- perf-table:end -->"
FILE = re.compile(r"(?P<host>[a-z0-9]+)-(?P<shape>.+?)-(?P<run>run\d+)(?:-(?P<label>[\w.-]+))?\.jsonl")


def family_of(profile: str) -> str:
    """baseline, seed, unsloth or ours (bench/train_gpu.py's profile names)."""
    name = profile.split("+")[0]
    if name in ("baseline", "seed"):
        return name
    return "unsloth" if name.startswith("unsloth") else "ours"


def measured_rows(path: Path) -> list[dict]:
    """The measured (workload, profile) rows of one result file, in file order; build, ratio and error lines
    are left out."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "real_tokens_per_s" in row and "profile" in row:
                rows.append(row)
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row plus vs_seed / vs_unsloth / vs_baseline, against rows of the same list (one invocation)."""

    def reference(row: dict, family: str) -> dict | None:
        same_budget = family == "unsloth"
        for ref in rows:
            if ref["workload"] != row["workload"] or family_of(ref["profile"]) != family or "+" in ref["profile"]:
                continue
            if not same_budget or ref.get("memory_budget_gib") == row.get("memory_budget_gib"):
                return ref
        return None

    out = []
    for row in rows:
        ratios = {}
        for family in ("seed", "unsloth", "baseline"):
            ref = reference(row, family)
            if ref is not None:
                ratios[f"vs_{family}"] = row["real_tokens_per_s"] / ref["real_tokens_per_s"]
        out.append({**row, **ratios})
    return out


def files_for(runs: list[str], results: Path) -> list[Path]:
    """Result files of the named <host>-run<N> invocations, in the order named."""
    found = []
    for wanted in runs:
        host, _, run = wanted.rpartition("-")
        matches = sorted(
            p
            for p in results.glob("*.jsonl")
            if (m := FILE.fullmatch(p.name)) and m["host"] == host and m["run"] == run
        )
        if not matches:
            raise SystemExit(f"error: README names run {wanted!r} but no bench/results/{host}-*-{run}[-*].jsonl exists")
        found += matches
    return found


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _budget(row: dict) -> str:
    budget = row.get("memory_budget_gib")
    return "whole GPU" if budget is None else f"{budget:g} GiB"


def _steps(row: dict) -> str:
    if "step_s_median" in row:
        return f"{row['step_s_median']:.3f} ({row['step_s_min']:.3f}-{row['step_s_max']:.3f}), {row['steps_measured']}"
    return f"{row['step_s_mean']:.3f} mean, {row['steps_measured']}"


def render(files: list[Path]) -> str:
    lines = [
        (
            "| host, run | workload | profile | budget | settings | real tokens/s | vs seed | vs Unsloth | vs baseline "
            "| peak reserved | MFU | step s median (min-max), steps |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in files:
        m = FILE.fullmatch(path.name)
        for row in with_ratios(measured_rows(path)):
            settings = (
                f"micro-batch {row['micro_batch']} x {row['grad_accum']}, "
                f"{'checkpointing' if row['gradient_checkpointing'] else 'no checkpointing'}"
                f"{', packing' if row['packing'] else ''}{', offload' if row.get('offload') else ''}"
                f"{', compile' if row.get('compiled_layers') else ''}"
                f"{', fused LoRA' if row.get('fused_lora_layers') else ''}, {row['attn']}, "
                f"dropout {row['lora_dropout']:g}"
            )
            lines.append(
                f"| {m['host']}, {m['run']} | {row['workload']} | {row['profile']} | {_budget(row)} | {settings} "
                f"| {row['real_tokens_per_s']:,.0f} | {_ratio(row.get('vs_seed'))} | {_ratio(row.get('vs_unsloth'))} "
                f"| {_ratio(row.get('vs_baseline'))} | {row['peak_reserved_gib']:.1f} GiB | {row['mfu']:.2f} "
                f"| {_steps(row)} |"
            )
    return "\n".join(lines) + "\n"


def update(text: str, results: Path) -> str:
    """`text` with every marked table regenerated from `results`."""
    out, pos = [], 0
    for start in START.finditer(text):
        end = text.find(END, start.end())
        if end < 0:
            raise SystemExit(f"error: README.md: {start.group(0).strip()} has no {END} after it")
        out += [text[pos : start.end()], render(files_for(start["runs"].split(","), results))]
        pos = end
    return "".join(out) + text[pos:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args()
    current = README.read_text()
    fresh = update(current, RESULTS)
    if args.check:
        if fresh != current:
            sys.exit(
                "error: README.md's performance tables differ from bench/results; run python bench/render_table.py"
            )
        return
    README.write_text(fresh)


if __name__ == "__main__":
    main()
