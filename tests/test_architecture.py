"""The house rules of ARCHITECTURE.md, checked on the source tree with `ast` (no imports, milliseconds)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qlora_flow", "tasks", "flows", "deployments")
# Libraries that do the model work; a flow only orchestrates, so it never needs them.
ML_LIBRARIES = {"torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"}
MAX_FUNCTION_LINES = 120
# The one place allowed to import flows/tasks from qlora_flow/, and only inside functions: the CLI starts them.
CLI = "qlora_flow/cli.py"
# Store keys are spelled in qlora_flow/layout.py only.
KEY_PREFIXES = ("cache/", "runs/", "models/")


def _modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package imported, whether the import sits inside a function) for every import in the file."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return found


def _import_violations(path: Path) -> list[str]:
    rel, package = _rel(path), _rel(path).split("/")[0]
    forbidden = {
        "tasks": {"tasks", "flows", "deployments"},  # a stage stands alone: shared code lives in qlora_flow/
        "flows": {"deployments"} | ML_LIBRARIES,
        "qlora_flow": {"tasks", "flows", "deployments"},
        "deployments": {"tasks"} | ML_LIBRARIES,  # deployments name flows; the stages are the flows' business
    }[package]
    problems = []
    for module, in_function in _imports(path):
        allowed_lazily = rel == CLI and module in {"tasks", "flows"} and in_function
        if module in forbidden and not allowed_lazily:
            problems.append(f"{rel} imports {module}")
    return problems


def test_import_rules_hold_for_the_product_code():
    problems = [problem for path in _modules(*PACKAGES) for problem in _import_violations(path)]
    assert problems == []


@pytest.mark.parametrize(
    ("rel", "source", "expected"),
    [
        ("tasks/merge.py", "from tasks.evaluate import local_path\n", ["tasks/merge.py imports tasks"]),
        ("tasks/merge.py", "def f():\n    import tasks.train\n", ["tasks/merge.py imports tasks"]),
        (
            "flows/sweep.py",
            "import torch\nfrom tasks.train import x\nfrom flows.pipeline import y\n",
            ["flows/sweep.py imports torch"],
        ),
        (
            "qlora_flow/pull.py",
            "def f():\n    from flows.pipeline import qlora_pipeline\n",
            ["qlora_flow/pull.py imports flows"],
        ),
        (CLI, "from flows.pipeline import qlora_pipeline\n", [f"{CLI} imports flows"]),
        (CLI, "def run():\n    from flows.pipeline import qlora_pipeline\n", []),
    ],
)
def test_import_rule_checker_catches_what_it_should(tmp_path, monkeypatch, rel, source, expected):
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    path.write_text(source)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)  # what _rel measures paths from
    assert _import_violations(path) == expected


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{_rel(path)}::{node.name}"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_is_longer_than_120_lines():
    long = [name for path in _modules("qlora_flow", "tasks", "flows") for name in _long_functions(path)]
    assert long == []


def test_long_function_checker_counts_the_whole_body(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    (tmp_path / "ok.py").write_text(f"def fits():\n{body}")
    (tmp_path / "long.py").write_text(f"def too_long():\n{body}    return x0\n")
    assert _long_functions(tmp_path / "ok.py") == []
    assert _long_functions(tmp_path / "long.py") == ["long.py::too_long"]


def _spelled_keys(path: Path) -> list[str]:
    """String literals (f-strings by their leading text) that start like a store key; docstrings excluded."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    keys = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            text = node.values[0].value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
        else:
            continue
        if isinstance(text, str) and text.startswith(KEY_PREFIXES):
            keys.append(f"{_rel(path)}:{node.lineno}: {text!r}")
    return keys


def test_store_keys_are_spelled_in_the_layout_module_only():
    spelled = [
        key
        for path in _modules("qlora_flow", "tasks", "flows")
        if _rel(path) != "qlora_flow/layout.py"
        for key in _spelled_keys(path)
    ]
    assert spelled == []
    assert _spelled_keys(ROOT / "qlora_flow/layout.py"), "the checker found no key in layout.py itself"


def _copy_hashed_sources(dest: Path) -> None:
    for package in ("qlora_flow", "tasks"):
        for path in (ROOT / package).rglob("*.py"):
            target = dest / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())


def _adapter_fingerprint_with_sources_in(root: Path) -> str:
    """training_fingerprint with code_version reading the project sources under root."""
    from conftest import placeholder_refs

    import qlora_flow.fingerprint as fingerprint
    from qlora_flow.config import PipelineConfig
    from tasks.train import training_fingerprint

    data, base = placeholder_refs()
    real = fingerprint.__file__
    try:
        fingerprint.__file__ = str(root / "qlora_flow" / "fingerprint.py")  # code_version hashes from here
        return training_fingerprint(PipelineConfig(), data, base)
    finally:
        fingerprint.__file__ = real


def test_editing_the_task_wrapper_docstring_does_not_change_the_adapter_fingerprint(tmp_path):
    _copy_hashed_sources(tmp_path)
    before = _adapter_fingerprint_with_sources_in(tmp_path)
    wrapper = tmp_path / "tasks" / "train.py"
    wrapper.write_text(wrapper.read_text().replace('"""Stage 3:', '"""Stage three (reworded):', 1))
    assert _adapter_fingerprint_with_sources_in(tmp_path) == before
    # ...while an edit to the recipe's code retrains: the check above could fail
    recipe = tmp_path / "qlora_flow" / "recipe.py"
    recipe.write_text(recipe.read_text() + "\n# an edit\n")
    assert _adapter_fingerprint_with_sources_in(tmp_path) != before
