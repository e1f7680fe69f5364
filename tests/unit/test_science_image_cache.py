"""The science image is rebuilt only when its inputs change: each layer's cache key, as
containers/build-science-image.sh --plan computes it in a copy of the project (the real build,
about 2 minutes the first time, runs in .ci/run)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent.parent


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The build's inputs (and a README that is not one), copied."""
    copy = tmp_path / "project"
    for part in ("containers", "hpcddf", "site_configs"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    return copy


def _plan(project: Path) -> dict[str, tuple[str, str]]:
    out = subprocess.run(["bash", str(project / "containers" / "build-science-image.sh"), "--plan",
                          str(project / "image")], capture_output=True, text=True, timeout=60, check=True)
    return {name: (what, digest) for name, what, digest in (ln.split() for ln in out.stdout.splitlines())}


def _built(project: Path) -> None:
    """Stamp both layers as the build does once it has made them."""
    for name, (_, digest) in _plan(project).items():
        layer = project / ("image.base" if name == "base" else "image")
        layer.mkdir(exist_ok=True)
        (layer / ".hpcddf-stamp").write_text(digest + "\n")


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_each_layer_is_rebuilt_only_when_its_inputs_change(project: Path) -> None:
    assert {n: w for n, (w, _) in _plan(project).items()} == {"base": "build", "image": "build"}
    _built(project)
    assert {n: w for n, (w, _) in _plan(project).items()} == {"base": "up-to-date", "image": "up-to-date"}
    _append(project / "README.md", "\nnot an input\n")
    assert {n: w for n, (w, _) in _plan(project).items()} == {"base": "up-to-date", "image": "up-to-date"}
    _append(project / "hpcddf" / "engine" / "state.py", "\n# changed\n")  # hpcddf: the top layer only
    assert {n: w for n, (w, _) in _plan(project).items()} == {"base": "up-to-date", "image": "build"}
    _built(project)
    _append(project / "site_configs" / "local.toml", "\n# changed\n")
    assert _plan(project)["image"][0] == "build"
    _built(project)
    _append(project / "pyproject.toml", "\n# a pin changed\n")  # the science stack: both layers
    assert {n: w for n, (w, _) in _plan(project).items()} == {"base": "build", "image": "build"}
    _built(project)
    _append(project / "containers" / "science-image.env", "\n# a package added\n")
    assert {n: w for n, (w, _) in _plan(project).items()} == {"base": "build", "image": "build"}
