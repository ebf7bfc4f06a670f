#!/usr/bin/env bash
# Check an exported GGUF with llama.cpp itself (through llama-cpp-python, built from its PyPI sdist),
# since a file that only our own reader accepts is not an export.
#   bash bench/llamacpp_check.sh                      # build only (once; into $LLAMACPP_VENV)
#   bash bench/llamacpp_check.sh MODEL.gguf [PROMPT]  # greedy chat answer with the file's own chat template
# The build compiles llama.cpp (CPU backend) with $JOBS jobs and prints its wall time.
set -euo pipefail
VENV=${LLAMACPP_VENV:-/tmp/qlora-flow-llamacpp}
PY=${PYTHON:-python3}
if ! "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  "$PY" -m venv "$VENV"
  start=$(date +%s)
  CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} nice -n 10 "$VENV/bin/pip" install -q --no-binary llama-cpp-python \
    "llama-cpp-python${LLAMACPP_VERSION:+==$LLAMACPP_VERSION}"
  echo "built llama-cpp-python $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)') in $(( $(date +%s) - start )) s"
fi
[ $# -eq 0 ] && exit 0
"$VENV/bin/python" - "$@" <<'EOF'
import json, sys, time
from llama_cpp import Llama

path = sys.argv[1]
prompt = sys.argv[2] if len(sys.argv) > 2 else "Please ship 7 desk lamps to Oslo for Ravi Novak."
started = time.perf_counter()
llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
loaded = time.perf_counter() - started
# create_chat_completion renders with the chat template stored in the GGUF (tokenizer.chat_template)
out = llm.create_chat_completion([{"role": "user", "content": prompt}], temperature=0.0, max_tokens=64)
print(json.dumps({
    "file": path, "load_s": round(loaded, 2), "answer": out["choices"][0]["message"]["content"],
    "finish_reason": out["choices"][0]["finish_reason"], "completion_tokens": out["usage"]["completion_tokens"],
}))
EOF
