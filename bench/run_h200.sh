#!/usr/bin/env bash
# The GPU measurements behind the README's performance section, as run on the lent H200 machines.
#   bash bench/run_h200.sh variants   # 2 GPUs: W1 speed levers on GPU 0 | 8B merge memory on GPU 1
#   bash bench/run_h200.sh final      # 2 GPUs: baseline vs ours (W1 on GPU 0 | W2 + merge on GPU 1), DDP
#   bash bench/run_h200.sh sweep      # 2 GPUs: one training vs two side by side (GpuTaskRunner)
#   bash bench/run_h200.sh lowmem     # 1 GPU: W1 baseline vs the planner's 7 GiB profile
#   bash bench/run_h200.sh w2         # 1 GPU: W2 baseline vs ours
#   bash bench/run_h200.sh single     # 1 GPU: lowmem, then w2
#   bash bench/run_h200.sh levers     # 1 GPU: W1 at 7 GiB, baseline vs the planner's profile and its candidates
#                                       (PROFILES=a,b,... replaces the list)
# Wheels the image lacks travel in .whl/ (see README); results land in $OUT (default bench/out).
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PREFECT_HOME=/tmp/prefect-home
python3 -c "import prefect, pandera, trl, bitsandbytes, flows.sweep, tasks.merge; print('imports ok')" 2>&1 | tail -3
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
ROOT=/tmp/bench-models
build() { CUDA_VISIBLE_DEVICES=0 python3 bench/train_gpu.py --shape llama3-8b --build-only --root $ROOT; }
train() {  # GPUS WORKLOADS PROFILES FILE
  CUDA_VISIBLE_DEVICES=$1 python3 bench/train_gpu.py --shape llama3-8b --workloads "$2" --profiles "$3" \
    --steps 5 --warmup 2 --root $ROOT > "$OUT/$4" 2> "$OUT/$4.err"
}
case "${1:-}" in
  variants)
    (build > "$OUT/build.jsonl" 2>&1; train 0 W1 ours,ours+liger,ours+compile,ours+prof w1-variants.jsonl) &
    # Random weights give near-flat logits, whose top-1 flips under any bf16 rounding: 0.9, not 0.99.
    (CUDA_VISIBLE_DEVICES=1 python3 bench/merge_memory.py --shape llama3-8b --device cuda --root /tmp/merge-bench \
      --min-top1-agreement 0.9 > "$OUT/merge-8b.jsonl" 2> "$OUT/merge-8b.err") &
    wait ;;
  sweep)
    python3 bench/sweep_gpus.py --shape llama3.2-1b --steps 100 > "$OUT/sweep.json" 2> "$OUT/sweep.err" ;;
  final)
    build > "$OUT/build.jsonl" 2>&1
    train 0 W1 baseline,ours,budget40,lowmem w1-final.jsonl &
    train 1 W2 baseline,ours w2-final.jsonl &
    wait
    train 0,1 W2 ours+ddp w2-ddp.jsonl ;;
  lowmem)
    build > "$OUT/build.jsonl" 2>&1
    # The planner's own 7 GiB choice (micro-batch 4, checkpointing, offload). Its candidates are in
    # bench/results/h200-llama3-8b-run6-lowmem.jsonl; micro-batch 4 without offload, or 8 with it, ran out of memory.
    train 0 W1 baseline,lowmem w1-lowmem.jsonl ;;
  w2)
    build > "$OUT/build.jsonl" 2>&1
    train 0 W2 baseline,ours w2-single.jsonl ;;
  levers)
    build > "$OUT/build.jsonl" 2>&1
    train 0 W1 "${PROFILES:-baseline,lowmem,lowmem+prof,baseline+prof,lowmem+nopack,lowmem+liger}" w1-levers.jsonl ;;
  single)  # what one H200 can measure of `final` and `lowmem`, in one call
    bash "$0" lowmem; bash "$0" w2 ;;
  *) echo "usage: $0 variants|final|sweep|lowmem|w2|single|levers"; exit 2 ;;
esac
tail -q -n 3 "$OUT"/*.err 2>/dev/null | cut -c1-400
