"""Training backends: the name in `training.backend` -> the module that trains the adapter.

A backend module keeps the contract in qlora_flow/recipe.py's docstring: it provides
`train_lora(cfg, plan, inputs, on_checkpoint, on_log) -> TrainingStats`, with `RecipeInputs` and
`TrainingStats` from qlora_flow.recipe. The training stage (tasks/train.py) prepares the device and plans
with recipe.py's `prepare_device` and `make_plan` for every backend, then calls the selected backend's
`train_lora` (in its child process too: the child validates the same config and looks the name up here).

Adding a backend is its module beside recipe.py plus one entry in TRAINING_BACKENDS. No heavy import
here: config validation checks names against the table, before torch is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

DEFAULT_BACKEND = "trl"

TRAINING_BACKENDS: dict[str, str] = {
    "trl": "qlora_flow.recipe",  # TRL's SFTTrainer on a PEFT LoRA model (QLoRA on the NF4 base)
}

# Where the stage's planning (make_plan, prepare_device) and the contract's types live.
PLANNING_MODULE = "qlora_flow.recipe"


def known_backends() -> list[str]:
    return sorted(TRAINING_BACKENDS)


def training_backend(name: str) -> ModuleType:
    """The module implementing the recipe contract for this backend name (validated by the config)."""
    return importlib.import_module(TRAINING_BACKENDS[name])


def backend_code_modules(name: str) -> tuple[str, ...]:
    """The modules of a backend whose source the adapter fingerprint hashes: the planning module, which every
    backend's plan and types come from, and the backend's own, each once (for trl both are recipe.py)."""
    return tuple(dict.fromkeys((PLANNING_MODULE, TRAINING_BACKENDS[name])))
