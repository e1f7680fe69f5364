"""The image recipe installs exactly the science stack pyproject.toml pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent


def _recipe_pins() -> dict[str, str]:
    text = (ROOT / "containers" / "hpcddf.def").read_text(encoding="utf-8")
    post = text.split("%post", 1)[1].split("\n%", 1)[0]
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"([A-Za-z0-9_.-]+)==([0-9][^\s\\]*)", post)}


def _science_pins() -> dict[str, str]:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pins = {}
    for req in extra["project"]["optional-dependencies"]["science"]:
        name, sep, version = req.partition("==")
        assert sep, f"science extra entry {req!r} is not pinned with =="
        pins[name.lower()] = version
    return pins


def test_recipe_pins_equal_the_science_extra():
    assert _recipe_pins() == _science_pins()


def test_recipe_installs_hpcddf_and_has_the_files_it_needs():
    text = (ROOT / "containers" / "hpcddf.def").read_text(encoding="utf-8")
    assert "pip install --no-cache-dir /opt/hpcddf" in text
    for src in re.findall(r"^\s+(\S+) /opt/hpcddf/", text, flags=re.M):
        assert (ROOT / src).exists(), f"%files copies {src}, which is not in the repository"
    assert "killMS==3.3.0" in text and "DDFacet==0.9.1.0" in text
