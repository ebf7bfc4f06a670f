#!/usr/bin/env bash
# One command for a local Prefect stack on loopback: server (SQLite under .qlora-flow/prefect),
# a process worker and the qlora-flow deployments. Open http://127.0.0.1:${PORT:-4200} and click "Run".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -m deployments.local up --port "${PORT:-4200}" "$@"
