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
    assert (target / "kdcache" / "offline" / "sources" / "images.py").exists()  # a sub-package, listed in pyproject
    # The installed copy imports on its own, from a directory without the sources.
    code = (
        "import kdcache.service.app, kdcache.service.client, kdcache.offline.train, kdcache.demo.digits;print(kdcache.service.app.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(target), "PATH": ""}, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))


def test_the_dockerfile_dependency_layer_creates_every_package_folder():
    """The image installs the dependencies from pyproject.toml alone, with empty package folders
    (so that the layer survives source edits); setuptools refuses a listed package whose folder
    is missing, which only the container build would otherwise find."""
    import re

    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"^packages = \[(.*)\]$", pyproject, re.M).group(1)
    mapping = dict(re.findall(r'^"(kdcache\.\w+)" = "(\w+)"$', pyproject, re.M))
    folders = set()
    for name in re.findall(r'"([\w.]+)"', packages):
        top = ".".join(name.split(".")[:2])
        folders.add("/".join([mapping[top], *name.split(".")[2:]]))
    made = re.search(r"mkdir -p ([^\\]+)", (ROOT / "Dockerfile").read_text()).group(1).split()
    made_with_parents = {p.removeprefix("/src/") for path in made for p in [path, *[str(x) for x in Path(path).parents]]}
    assert folders <= made_with_parents, f"the Dockerfile's mkdir misses {sorted(folders - made_with_parents)}"
