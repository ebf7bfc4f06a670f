"""Peak memory and wall time of the merge stage (`tasks/merge.py: merge_adapter`) on a random-weight model.

    python bench/merge_memory.py --shape llama3-8b --device cuda --root /tmp/merge-bench \\
        [--no-verify] [--prompts 2] [--max-new-tokens 16] [--min-top1-agreement 0.99]

The parent builds, once per shape, a local artifact store under --root holding what the merge reads: a
random bf16 checkpoint of the named Llama shape (safetensors shards, with the test tokenizer and its chat
template), a random LoRA adapter (r=16, alpha=32, all seven projections, lora_B non-zero so the merge changes
every targeted weight) and a few eval conversations for the verification. Weight values do not change memory or
time, so random weights stand in for the real model; they can change the outcome, though: a random model's
nearly flat logits may fail the bf16 top-1 check, and then the stage merges again in float32 (shipped_dtype).

The merge runs in a fresh child process, so its peak RSS and CUDA peak counters hold the merge alone, not
the parent's model building. Peak RSS is the child's VmHWM (/proc/self/status): getrusage's ru_maxrss would not
do, as Linux carries the parent's high-water mark at fork time over the exec into the child. It counts resident
pages of memory-mapped safetensors files too. rss_after_imports_gib is the child's VmHWM before the merge starts
(torch, transformers, peft, prefect), already inside peak_rss_gib. --min-top1-agreement below the stage's 0.99
lets a random model's bf16 merge pass, to measure the usual path rather than the float32 fallback.

Prints one JSON line, also written to $OUT/merge_memory_<shape>_<device>.json when OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train_gpu import SHAPES, random_model  # noqa: E402
from qlora_flow.config import ALL_PROJECTIONS, MergeConfig, PipelineConfig  # noqa: E402
from qlora_flow.refs import AdapterRef, PreparedBase, ValidatedDataset  # noqa: E402
from qlora_flow.store import LocalStore  # noqa: E402

TOKENIZER_DIR = ROOT / "tests/fixtures/tokenizer"
GIB = 2**30
NAMES = ["Ada", "Bob", "Cyd", "Dee", "Eve", "Fox", "Gus", "Hal"]  # one eval conversation each


def keys(shape: str) -> tuple[str, str, str]:
    return f"cache/base/{shape}/full", f"cache/adapter/{shape}/adapter", f"cache/data/{shape}"


def build_models(store: LocalStore, shape: str) -> None:
    """Random bf16 base (built on the GPU when there is one) and a random LoRA adapter on it, one model in memory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    base_key, adapter_key, _ = keys(shape)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = random_model(shape, tokenizer)
    model.save_pretrained(store.workdir(base_key), max_shard_size="5GB")
    tokenizer.save_pretrained(store.workdir(base_key))
    store.commit(base_key)

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=ALL_PROJECTIONS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would make the merge a no-op
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    model.save_pretrained(store.workdir(adapter_key))
    tokenizer.save_pretrained(store.workdir(adapter_key))
    store.commit(adapter_key)
    del model
    gc.collect()  # peft and transformers modules hold reference cycles: free the GPU memory before the child runs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_data(store: LocalStore, shape: str) -> None:
    """A few short chat conversations in the validated-split format (parquet, `messages` column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Record {i}: {name} is {20 + 7 * i} years old."},
                {"role": "assistant", "content": json.dumps({"name": name, "age": 20 + 7 * i})},
            ]
        }
        for i, name in enumerate(NAMES)
    ]
    data_key = keys(shape)[2]
    for split in ("train", "eval"):
        pq.write_table(pa.Table.from_pylist(rows), store.workdir(data_key) / f"{split}.parquet")
    store.commit(data_key)


def build_refs(store: LocalStore, shape: str, device: str) -> dict:
    """The references the pipeline's earlier stages would hand to the merge, as JSON-ready dicts."""
    from safetensors import safe_open

    base_key, adapter_key, data_key = keys(shape)
    size = sum(p.stat().st_size for p in store.fetch(base_key).glob("*.safetensors"))
    with safe_open(store.fetch(adapter_key) / "adapter_model.safetensors", "pt") as fh:
        lora_params = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    n = len(NAMES)
    base = PreparedBase(
        model_id=f"random/{shape}",
        architecture="LlamaForCausalLM",
        full_precision_uri=store.uri(base_key),
        fingerprint=f"bench-base-{shape}",
        compute_dtype="bfloat16",
        device=device,
        parameters=size // 2,
        footprint_bytes_16bit=size,
        load_seconds=0.0,
    )
    adapter = AdapterRef(
        uri=store.uri(adapter_key),
        checkpoint_uri=store.uri(f"{adapter_key}-checkpoints"),
        fingerprint=f"bench-adapter-{shape}",
        trainable_parameters=lora_params,
        steps=1,
        loss_history=[],
        tokens_seen=0,
        train_seconds=0.0,
        tokens_per_second=0.0,
    )
    data = ValidatedDataset(
        train_uri=store.uri(f"{data_key}/train.parquet"),
        eval_uri=store.uri(f"{data_key}/eval.parquet"),
        report_uri=store.uri(f"{data_key}/report.json"),
        n_input_rows=2 * n,
        n_train=n,
        n_eval=n,
        n_rejected=0,
        source_format="messages",
        fingerprint=f"bench-data-{shape}",
    )
    return {"base": base.model_dump(), "adapter": adapter.model_dump(), "data": data.model_dump(), "bytes_16bit": size}


def peak_rss_gib() -> float:
    """This process's resident-set high-water mark (VmHWM, in kB)."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 2**20, 3)


def run_child(args) -> dict:
    """In the fresh process: one merge_adapter call, measured."""
    import time

    import torch

    from tasks.merge import MergeVerificationError, merge_adapter

    refs = json.loads(sys.stdin.read())
    cfg = PipelineConfig.model_validate(
        {
            "merge": {
                "verify": args.verify,
                "verify_prompts": args.prompts,
                "min_top1_agreement": args.min_top1_agreement,
                "verify_dtype": args.verify_dtype,
            },
            "evaluation": {"max_new_tokens": args.max_new_tokens},
            "execution": {"store": args.root, "device": args.device},
        }
    )
    base, adapter = PreparedBase(**refs["base"]), AdapterRef(**refs["adapter"])
    data = ValidatedDataset(**refs["data"])
    cuda = args.device == "cuda"
    result: dict = {"rss_after_imports_gib": peak_rss_gib()}
    started = time.perf_counter()
    try:
        merged = merge_adapter(
            cfg, LocalStore(args.root), f"bench-{args.shape}-{args.device}", base, adapter, data=data
        )
        result.update(shipped_dtype=merged.dtype, merged_uri=merged.uri, verification=merged.verification)
    except MergeVerificationError as exc:
        result.update(shipped_dtype=None, merged_uri=None, verification={}, error=str(exc))
    if cuda:
        torch.cuda.synchronize()
    result["merge_wall_s"] = round(time.perf_counter() - started, 2)
    result["peak_rss_gib"] = peak_rss_gib()
    result["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None
    result["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None
    return result


def key_numbers(verification: dict) -> dict:
    wanted = ("max_abs_logit_diff", "top1_agreement", "greedy_mismatches")
    kept = ("verified", "compute_dtype", "float32_fallback_reason")
    return {k: v for k, v in verification.items() if k.endswith(wanted) or k in kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--root", default="/tmp/merge-bench")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--min-top1-agreement", type=float, default=MergeConfig().min_top1_agreement)
    parser.add_argument("--verify-dtype", default=MergeConfig().verify_dtype, choices=["auto", "float32", "saved"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return

    store = LocalStore(args.root)
    args.root = store.root
    base_key, adapter_key, data_key = keys(args.shape)
    if not (store.is_complete(base_key) and store.is_complete(adapter_key)):
        build_models(store, args.shape)
    if not store.is_complete(data_key):
        build_data(store, args.shape)
    refs = build_refs(store, args.shape, args.device)

    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--root",
        args.root,
        "--verify" if args.verify else "--no-verify",
        "--prompts",
        str(args.prompts),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--min-top1-agreement",
        str(args.min_top1_agreement),
        "--verify-dtype",
        args.verify_dtype,
    ]
    proc = subprocess.run(cmd, input=json.dumps(refs), stdout=subprocess.PIPE, text=True, check=True)
    child = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT ") :])

    size_gib = refs["bytes_16bit"] / GIB
    result = {
        "shape": args.shape,
        "device": args.device,
        "verify": args.verify,
        "min_top1_agreement": args.min_top1_agreement,
        "verify_dtype": args.verify_dtype,
        "model_16bit_gib": round(size_gib, 3),
        "merge_wall_s": child["merge_wall_s"],
        "peak_rss_gib": child["peak_rss_gib"],
        "rss_over_16bit": round(child["peak_rss_gib"] / size_gib, 2),
        "rss_after_imports_gib": child["rss_after_imports_gib"],
        "gpu_peak_allocated_gib": child["gpu_peak_allocated_gib"],
        "gpu_peak_reserved_gib": child["gpu_peak_reserved_gib"],
        "shipped_dtype": child["shipped_dtype"],
        "merged_uri": child["merged_uri"],
        "verification": key_numbers(child["verification"]),
    }
    if "error" in child:
        result["error"] = child["error"]
    line = json.dumps(result)
    print(line, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"merge_memory_{args.shape}_{args.device}.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
