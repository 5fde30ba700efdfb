"""What `pip install` puts into site-packages: one top-level import name, `kdcache`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_an_install_adds_only_the_kdcache_import_name(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(ROOT)],
        check=True, capture_output=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    top_level = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert top_level == ["kdcache"]
    assert sorted(p.name for p in (target / "kdcache").iterdir() if p.name != "__pycache__") == ["demo", "offline", "service"]
    assert (target / "kdcache" / "offline" / "cache" / "writer.py").exists()
    assert (target / "kdcache" / "offline" / "cache" / "sources" / "images.py").exists()  # a sub-package, listed in pyproject
    # The installed copy imports on its own, from a directory without the sources.
    code = (
        "import kdcache.service.app, kdcache.service.client, kdcache.offline.train, kdcache.demo.digits;print(kdcache.service.app.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(target), "PATH": ""}, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
