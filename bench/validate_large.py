"""Benchmark: validate a generated N-row chat JSONL (default 1,000,000) and print seconds and peak RSS as JSON.

    python bench/validate_large.py [--rows N] [--keep DIR]

The file is written in a streaming way (the generator does not inflate the peak), then
validate_dataset runs on it with the test tokenizer (the real SmolLM2 tokenizer and template).
A few bad rows are mixed in so the quarantine path is exercised too.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import AutoTokenizer  # noqa: E402

from qlora_flow.config import load_config  # noqa: E402
from qlora_flow.store import LocalStore  # noqa: E402
from tasks.validate import validate_dataset  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "record", "person", "city", "river", "number", "value", "answer", "field"]


def write_rows(path: Path, n: int, seed: int = 0) -> int:
    """Unique chat rows (so the duplicate sets hold n entries), every 10,000th one broken."""
    rng = random.Random(seed)
    bad = 0
    with open(path, "w") as fh:
        for i in range(n):
            if i % 10_000 == 9_999:
                fh.write('{"messages": [{"role": "user", "content": "cut off\n')
                bad += 1
                continue
            text = " ".join(rng.choices(WORDS, k=rng.randint(5, 40)))
            row = {
                "messages": [
                    {"role": "user", "content": f"Row {i}: extract the fields from: {text}"},
                    {"role": "assistant", "content": json.dumps({"id": i, "words": text.split()[:5]})},
                ]
            }
            fh.write(json.dumps(row) + "\n")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "large.jsonl"
        bad = write_rows(data, args.rows)
        cfg = load_config(
            None,
            {
                "data.train_path": str(data),
                "data.max_rejected_fraction": 0.01,
                "training.max_seq_length": 512,
                "execution.store": str(Path(tmp) / "store"),
            },
        )
        tokenizer = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "tokenizer")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        result = validate_dataset(cfg, LocalStore(cfg.execution.store), tokenizer)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        # CPU time is the steadier number on a shared machine; wall time includes waiting for cores
        cpu_seconds = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
        start = time.perf_counter()
        validate_dataset(cfg, LocalStore(cfg.execution.store), tokenizer)
        cached_seconds = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "file_mib": round(data.stat().st_size / 2**20, 1),
                    "seconds": round(seconds, 1),
                    "cpu_seconds": round(cpu_seconds, 1),
                    "rows_per_second": round(args.rows / seconds),
                    "cache_hit_seconds": round(cached_seconds, 1),
                    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                    "rss_before_validation_mib": round(usage.ru_maxrss / 1024),
                    "n_train": result.n_train,
                    "n_eval": result.n_eval,
                    "n_rejected": result.n_rejected,
                    "expected_rejected": bad,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
