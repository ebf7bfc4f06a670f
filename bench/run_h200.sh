#!/usr/bin/env bash
# The GPU measurements behind the README's performance section, as run on the lent H200 machines.
# Every phase ends within PHASE_S seconds (default 510, under a 10-minute window with the machine's start):
# a row still running then is killed and reported as an error, later rows are reported as not run, and each
# row is written to $OUT/<file> (and printed) as soon as it finishes.
#   bash bench/run_h200.sh check      # 1 GPU, ~2 min: wheels install, Unsloth imports, 1B-shape smoke rows
#   bash bench/run_h200.sh side-w1    # 1 GPU: W1 seed recipe, ours and Unsloth at whole GPU and 40 GiB
#   bash bench/run_h200.sh side-w1-low  # 1 GPU: W1 seed recipe, ours and Unsloth at 16 and 7 GiB
#   bash bench/run_h200.sh side-w2    # 1 GPU: W2 seed recipe, ours and Unsloth at every budget
#   bash bench/run_h200.sh side-pair  # 2 GPUs: W1 rows (PROFILES_W1) on GPU 0 | W2 rows (PROFILES_W2) on GPU 1
#   bash bench/run_h200.sh side-seq   # 1 GPU: the same rows one after the other, W2's first
#   bash bench/run_h200.sh variants   # 2 GPUs: W1 speed levers on GPU 0 | 8B merge memory on GPU 1
#   bash bench/run_h200.sh final      # 2 GPUs: baseline vs ours (W1 on GPU 0 | W2 on GPU 1)
#   bash bench/run_h200.sh ddp        # 2 GPUs: W2 ours, DDP over both vs one GPU
#   bash bench/run_h200.sh sweep      # 2 GPUs: one training vs two side by side (GpuTaskRunner)
#   bash bench/run_h200.sh lowmem     # 1 GPU: W1 baseline vs the planner's 7 GiB profile
#   bash bench/run_h200.sh w2         # 1 GPU: W2 baseline vs ours
#   bash bench/run_h200.sh levers     # 1 GPU: W1 at 7 GiB, baseline vs the planner's profile and its candidates
#                                       (PROFILES=a,b,... replaces the list)
# side-* phases whose PROFILES name a +torchnf4 row first run bench/check_nf4.py (the torch NF4 path against
# bitsandbytes' CUDA kernels) into $OUT/nf4-check.jsonl.
# Wheels the image lacks travel in .whl/ and, for Unsloth, .whl-unsloth/ (bench/fetch_wheels.sh fills both;
# carry both); results land in $OUT (default bench/out).
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"; export OUT
PHASE_S=${PHASE_S:-510}
INSTALL=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
"${INSTALL[@]}" --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PREFECT_HOME=/tmp/prefect-home
if compgen -G ".whl-unsloth/*.whl" > /dev/null; then
  # Unsloth pins older trl/datasets: its own directory, first on the path of its rows only (train_gpu.py).
  "${INSTALL[@]}" --target /tmp/site-unsloth .whl-unsloth/*.whl >> "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
  export UNSLOTH_SITE=/tmp/site-unsloth
fi
python3 -c "import trl, bitsandbytes; print('imports ok')" 2>&1 | tail -3
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
ROOT=/tmp/bench-models
left() { echo $((PHASE_S - SECONDS)); }
build() { CUDA_VISIBLE_DEVICES=0 python3 bench/train_gpu.py --shape "${SHAPE:-llama3-8b}" --build-only --root $ROOT; }
train() {  # GPUS WORKLOADS PROFILES FILE: rows are printed and written as they finish
  CUDA_VISIBLE_DEVICES=$1 PYTHONUNBUFFERED=1 python3 bench/train_gpu.py --shape "${SHAPE:-llama3-8b}" --workloads "$2" \
    --profiles "$3" --steps "${STEPS:-10}" --warmup "${WARMUP:-2}" --root $ROOT --time-limit-s "$(left)" \
    2> "$OUT/$4.err" | tee "$OUT/$4" | cut -c1-600
}
nf4_check() {  # before +torchnf4 rows: the torch NF4 path against bitsandbytes' CUDA kernels (bench/check_nf4.py)
  case "${PROFILES:-}" in
    *torchnf4*) timeout 150 python3 bench/check_nf4.py 2> "$OUT/nf4-check.err" | tee "$OUT/nf4-check.jsonl" | cut -c1-300 ;;
  esac
}
case "${1:-}" in
  check)
    PYTHONPATH=$UNSLOTH_SITE:$PYTHONPATH python3 -c "import unsloth, trl, transformers, peft, torch
print('unsloth', unsloth.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'torch', torch.__version__)" 2>&1 | tail -5
    SHAPE=llama3.2-1b STEPS=3 WARMUP=1 train 0 W1,W2 unsloth,seed check.jsonl ;;
  side-w1)
    build > "$OUT/build.jsonl" 2>&1
    nf4_check
    train 0 W1 "${PROFILES:-unsloth,seed,ours,unsloth40,budget40}" side-w1.jsonl ;;
  side-w1-low)
    build > "$OUT/build.jsonl" 2>&1
    nf4_check
    train 0 W1 "${PROFILES:-unsloth7,lowmem,unsloth16,budget16,seed}" side-w1-low.jsonl ;;
  side-w2)
    build > "$OUT/build.jsonl" 2>&1
    nf4_check
    train 0 W2 "${PROFILES:-unsloth,ours,seed,unsloth7,lowmem,unsloth16,budget16,unsloth40,budget40}" side-w2.jsonl ;;
  side-pair)  # 2 GPUs, two one-GPU phases at once: W1 rows on GPU 0 | W2 rows on GPU 1
    build > "$OUT/build.jsonl" 2>&1
    train 0 W1 "${PROFILES_W1:-unsloth40,budget40}" side-pair-w1.jsonl &
    train 1 W2 "${PROFILES_W2:-unsloth16,budget16}" side-pair-w2.jsonl &
    wait ;;
  side-seq)  # 1 GPU: side-pair's rows in one phase
    build > "$OUT/build.jsonl" 2>&1
    train 0 W2 "${PROFILES_W2:-unsloth7,lowmem}" side-pair-w2.jsonl
    train 0 W1 "${PROFILES_W1:-unsloth7,lowmem}" side-pair-w1.jsonl ;;
  variants)
    (build > "$OUT/build.jsonl" 2>&1; train 0 W1 ours,ours+liger,ours+compile,ours+prof w1-variants.jsonl) &
    # Random weights give near-flat logits, whose top-1 flips under any bf16 rounding: 0.9, not 0.99.
    (CUDA_VISIBLE_DEVICES=1 timeout "$(left)" python3 bench/merge_memory.py --shape llama3-8b --device cuda \
      --root /tmp/merge-bench --min-top1-agreement 0.9 > "$OUT/merge-8b.jsonl" 2> "$OUT/merge-8b.err") &
    wait ;;
  sweep)
    # Needs `bash bench/fetch_wheels.sh prefect` in .whl/ (carry .whl alone: Unsloth's wheels are not used here).
    python3 -c "import prefect, pandera, flows.sweep; print('prefect stack imports ok')" 2>&1 | tail -3
    timeout "$(left)" python3 bench/sweep_gpus.py --shape llama3.2-1b --steps "${SWEEP_STEPS:-100}" 2> "$OUT/sweep.err" | tee "$OUT/sweep.jsonl" ;;
  final)
    build > "$OUT/build.jsonl" 2>&1
    train 0 W1 baseline,ours,budget40,lowmem w1-final.jsonl &
    train 1 W2 baseline,ours w2-final.jsonl &
    wait ;;
  ddp)  # its own phase: after `final` it ran past a 10-minute window
    build > "$OUT/build.jsonl" 2>&1
    train 0,1 W2 ours,ours+ddp w2-ddp.jsonl ;;
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
  *) echo "usage: $0 check|side-pair|side-seq|side-w1|side-w1-low|side-w2|variants|final|ddp|sweep|lowmem|w2|levers"; exit 2 ;;
esac
tail -q -n 3 "$OUT"/*.err 2>/dev/null | cut -c1-400
