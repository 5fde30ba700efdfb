"""The module boundaries that docs/architecture.md promises, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names if node.module == "offline")
    return names


def test_the_service_imports_only_the_cache_format_the_model_registry_and_the_malloc_settings_from_offline():
    allowed = {"offline.cache", "offline.journal", "offline.malloc", "offline.models"}
    for path in sorted((ROOT / "service").glob("*.py")):
        used = {name for name in imported_modules(path) if name.startswith("offline.")}
        assert used <= allowed, f"{path.name} imports {sorted(used - allowed)}"


def test_the_trainer_never_imports_the_service_or_a_web_framework():
    for path in sorted((ROOT / "offline").glob("*.py")):
        used = imported_modules(path)
        bad = {name for name in used if name.split(".")[0] in {"service", "fastapi", "uvicorn", "starlette", "httpx"}}
        assert not bad, f"{path.name} imports {sorted(bad)}"
