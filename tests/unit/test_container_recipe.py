"""Every science image is built from one definition: containers/science-image.env (Debian
packages, hpcddf's extras) with pyproject.toml's pins. The Apptainer recipe and the Charliecloud
build both read it and name no package of their own, so the two images cannot drift apart."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent
CONTAINERS = ROOT / "containers"


def _env() -> dict[str, str]:
    """The shell assignments of science-image.env (it holds nothing else)."""
    out = {}
    for line in (CONTAINERS / "science-image.env").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_]+", key), f"not an assignment: {line!r}"
            out[key] = shlex.split(value)[0]
    return out


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]


def _recipe_post() -> str:
    text = (CONTAINERS / "hpcddf.def").read_text(encoding="utf-8")
    return text.split("%post", 1)[1].split("\n%", 1)[0]


def test_the_definition_names_packages_extras_and_mount_points():
    env = _env()
    assert set(env) == {"RUN_PACKAGES", "BUILD_PACKAGES", "EXTRAS", "MOUNT_POINTS"}
    assert "python3" in env["RUN_PACKAGES"].split() and "g++" in env["BUILD_PACKAGES"].split()
    extras = env["EXTRAS"].split(",")
    assert "science" in extras and set(extras) <= set(_extras())
    assert all(p.startswith("/") for p in env["MOUNT_POINTS"].split())


def test_the_science_stack_is_pinned_in_pyproject():
    pins = {}
    for req in _extras()["science"]:
        name, sep, version = req.partition("==")
        assert sep, f"science extra entry {req!r} is not pinned with =="
        pins[name.lower()] = version
    assert pins["ddfacet"] == "0.9.1.0" and pins["killms"] == "3.3.0"  # killMS 3.3.0 needs DDFacet 0.9


def test_the_apptainer_recipe_installs_only_what_the_definition_names():
    post = _recipe_post()
    assert ". /opt/hpcddf/science-image.env" in post
    assert "apt-get install -y --no-install-recommends $RUN_PACKAGES $BUILD_PACKAGES" in post
    assert 'pip install --no-cache-dir --break-system-packages "/opt/hpcddf[$EXTRAS]"' in post
    assert not re.search(r"==\d", post), "a pin of its own: pins belong in pyproject.toml"
    assert len(re.findall(r"apt-get install", post)) == 1 and len(re.findall(r"pip install", post)) == 1
    text = (CONTAINERS / "hpcddf.def").read_text(encoding="utf-8")
    assert re.search(r"^From: debian:bookworm", text, re.M)  # Debian's Python, as the Charliecloud build
    for src in re.findall(r"^\s+(\S+) /opt/hpcddf/", text, flags=re.M):
        assert (ROOT / src).exists(), f"%files copies {src}, which is not in the repository"


def test_the_charliecloud_build_installs_only_what_the_definition_names():
    script = (CONTAINERS / "build-science-image.sh").read_text(encoding="utf-8")
    assert ". containers/science-image.env" in script
    assert '--include="$(tr \' \' \',\' <<<"$RUN_PACKAGES")" bookworm' in script
    assert '"hpcddf[$EXTRAS]"' in script and 'wheels "$TMP/wheels" ".[$EXTRAS]"' in script
    assert not re.search(r"==\d", script)
    # the cache key covers every input of each layer
    assert ("BASE_HASH=$(hash_of containers/build-science-image.sh containers/science-image.env "
            "containers/debian-mirror.sh pyproject.toml)") in script
    assert "find hpcddf site_configs -type f" in script
