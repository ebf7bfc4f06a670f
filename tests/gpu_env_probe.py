"""Imported by a GpuTaskRunner test task's process when it unpickles the task, as peft is by the real ones."""

import os

DEVICES_AT_IMPORT = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
