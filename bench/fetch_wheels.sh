#!/usr/bin/env bash
# Fill .whl/ with the wheels the H200 image lacks for the training benches (it has torch, transformers,
# peft, accelerate, pyarrow and pandas). Everything that travels to the GPU machine must fit in 64 MiB,
# so bitsandbytes keeps only its CPU and CUDA 13.0 libraries (43 MB -> ~5 MB).
#   bash bench/fetch_wheels.sh            # training benches (train_gpu.py, merge_memory.py)
#   bash bench/fetch_wheels.sh prefect    # + the Prefect/pandera stack for sweep_gpus.py
#   bash bench/fetch_wheels.sh unsloth    # Unsloth and the versions it pins, in .whl-unsloth/ (DEST_UNSLOTH)
#   bash bench/fetch_wheels.sh prune DIR  # drop from DIR the wheels of packages the image already has
set -euo pipefail
DEST=$(realpath -m "${DEST:-.whl}"); mkdir -p "$DEST"
GET=(pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     --platform any)
# Packages the image has: a wheel is "<name>-<version>-...", so match the name up to the version's dash
# (a bare prefix glob like jinja2* also took jinja2_humanize_extension, which Prefect imports).
IMAGE_HAS=(numpy pandas pyarrow torch triton sympy networkx jinja2 markupsafe fsspec filelock)
prune() {
  local name
  for name in "${IMAGE_HAS[@]}"; do rm -f "$1/$name"-[0-9]*.whl; done
  rm -f "$1"/nvidia_*.whl  # CUDA libraries: every nvidia_* package comes with the image's torch
}
repack() {  # WHEEL COMMAND...: rewrite WHEEL after running COMMAND inside its unpacked files
  local whl=$1 tmp; shift
  tmp=$(mktemp -d); (cd "$tmp" && python3 -m zipfile -e "$whl" . && "$@")
  rm "$whl"; (cd "$tmp" && python3 -m zipfile -c "$whl" ./*)
  rm -rf "$tmp"
}
case "${1:-}" in
  prune) prune "$(realpath "$2")"; exit ;;
  unsloth)
    # Versions that accept the image's transformers 5.17 and torch 2.11 (unsloth pins trl <= 1.15 and
    # datasets < 5, so they get their own copies here); installed with --no-deps, so only what
    # `import unsloth` and its Llama training path import travel. No xformers: PyPI's newest (0.0.35) is
    # built for torch 2.10 + CUDA 12.8 and Unsloth refuses it on the image's 2.11 + CUDA 13 (uses PyTorch's SDPA).
    U=$(realpath -m "${DEST_UNSLOTH:-.whl-unsloth}"); mkdir -p "$U"
    "${GET[@]}" -d "$U" unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 \
      cut_cross_entropy==25.1.1
    # Unsloth's wheel carries its web "studio" (82 of 90 MB): training never imports it.
    for whl in "$U"/unsloth-*.whl; do repack "$whl" rm -r studio; done
    du -sh "$U"; exit ;;
esac
"${GET[@]}" -d "$DEST" "bitsandbytes>=0.50" "trl>=1.0,<2" "datasets>=3.0" dill multiprocess xxhash liger-kernel
if [ "${1:-}" = prefect ]; then
  # The resolver runs for the image's Python; drop what the image already has.
  pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DEST" \
    "prefect>=3.4,<4" "pandera[pandas]>=0.24"
  prune "$DEST"
fi
for whl in "$DEST"/bitsandbytes-*.whl; do
  repack "$whl" find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
done
du -sh "$DEST"
