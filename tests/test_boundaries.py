"""The module boundaries that docs/architecture.md promises, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
# Where each installed package's source lives (pyproject.toml's package-dir).
PACKAGES = {"offline": "kdcache.offline", "service": "kdcache.service", "demo": "kdcache.demo"}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[relative.parts[0]], *relative.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what a file imports, relative imports resolved, each ``from M import N``
    counted as both ``M`` and ``M.N`` (N may be a submodule)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_service_imports_only_the_cache_format_the_journal_the_model_registry_and_malloc_from_offline():
    allowed = ("kdcache.offline.cache", "kdcache.offline.journal", "kdcache.offline.malloc", "kdcache.offline.models")
    # One named extension, "the transfer-set readers, for teacher-push": the client that sends
    # --data (service/push.py, with the sample specs of service/client.py) opens it with
    # kdcache.offline.sources. No other service module may import them (the server never reads a transfer set).
    extensions = {"kdcache.offline.sources": {"client.py", "push.py"}}
    for path in sources("service"):
        used = {name for name in imported_modules(path) if name.startswith("kdcache.offline.")}
        allowed_here = allowed + tuple(name for name, files in extensions.items() if path.name in files)
        bad = {name for name in used if not any(name == a or name.startswith(a + ".") for a in allowed_here)}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_trainer_never_imports_the_service_or_a_web_framework():
    for path in sources("offline"):
        used = imported_modules(path)
        bad = {name for name in used if name.split(".")[0] in {"service", "fastapi", "uvicorn", "starlette", "httpx"}}
        bad |= {name for name in used if name.startswith("kdcache.service")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_cache_contract_needs_no_h5py():
    """The contract, ids, layouts and storage need no HDF5: a client (teacher-push) can use them
    without it, and importing the package does not load h5py until a reader or writer is used."""
    for name in ("contract", "ids", "keys", "layout", "rng", "storage", "manifest", "label_names", "faults", "transfer_set", "diagnostics"):
        path = ROOT / "offline" / "cache" / f"{name}.py"
        used = imported_modules(path)
        assert "h5py" not in used, f"{path.relative_to(ROOT)} imports h5py"
    for name in ("ids", "keys", "layout", "rng", "diagnostics", "label_names"):  # and no torch: the format's arithmetic is numpy
        path = ROOT / "offline" / "cache" / f"{name}.py"
        assert "torch" not in imported_modules(path), f"{path.relative_to(ROOT)} imports torch"


def test_the_resolver_sees_relative_imports():
    """A guard on the guard: the service's relative imports resolve to kdcache.offline names."""
    used = imported_modules(ROOT / "service" / "cli.py")
    assert any(name.startswith("kdcache.offline.") for name in used), sorted(used)


def test_importing_the_cache_package_loads_no_hdf5():
    import subprocess
    import sys

    code = "import sys, kdcache.offline.cache as c; c.normalize_ids([1]); print('h5py' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
