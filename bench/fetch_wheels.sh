#!/usr/bin/env bash
# Fill .whl/ with the wheels the H200 image lacks for the training benches (it has torch, transformers,
# peft, accelerate, pyarrow and pandas). Everything that travels to the GPU machine must fit in 64 MiB,
# so bitsandbytes keeps only its CPU and CUDA 13.0 libraries (43 MB -> ~5 MB).
#   bash bench/fetch_wheels.sh            # training benches (train_gpu.py, merge_memory.py)
#   bash bench/fetch_wheels.sh prefect    # + the Prefect/pandera stack for sweep_gpus.py
set -euo pipefail
DEST=$(realpath -m "${DEST:-.whl}"); mkdir -p "$DEST"
GET=(pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     --platform any -d "$DEST")
"${GET[@]}" "bitsandbytes>=0.50" "trl>=1.0,<2" "datasets>=3.0" dill multiprocess xxhash liger-kernel
if [ "${1:-}" = prefect ]; then
  # The resolver runs for the image's Python; drop what the image already has.
  pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DEST" \
    "prefect>=3.4,<4" "pandera[pandas]>=0.24"
  rm -f "$DEST"/{numpy,pandas,pyarrow,torch,triton,nvidia_,sympy,networkx,jinja2,markupsafe,fsspec,filelock}*-*.whl
fi
for whl in "$DEST"/bitsandbytes-*.whl; do
  tmp=$(mktemp -d); (cd "$tmp" && python3 -m zipfile -e "$whl" .)
  find "$tmp/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
  rm "$whl"; (cd "$tmp" && python3 -m zipfile -c "$whl" bitsandbytes bitsandbytes-*.dist-info)
  rm -rf "$tmp"
done
du -sh "$DEST"
