"""Does the container image hold what a stage will run? Asked once per attempt, before the
first step, so that an image without DDF.py, or with an older hpcddf than the one that
submitted the job, fails the stage in seconds with the fix instead of hours into it.

Run inside the image (``python3 -m hpcddf.engine.imageprobe CMD...``, through the stage's own
launcher) it prints one JSON line: hpcddf's version and source fingerprint there, and where
each command is found (null: missing). The node job compares that with its own hpcddf. The
version string alone cannot tell two builds of one version apart; the fingerprint (a hash of
hpcddf's Python sources) can, and is the same for an installed wheel and a checkout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hpcddf

PROBE_MODULE = "hpcddf.engine.imageprobe"
SITE_CONFIGS = "site_configs"  # the package hpcddf.site_configs: data, mapped from the checkout


def fingerprint(package_dir: Path | None = None) -> str:
    """sha256 over hpcddf's sources (relative path and content, in path order): its ``*.py``
    files and the shipped site configs, wherever the install put them (a wheel inside the
    package, a development install in the checkout's ``site_configs/``)."""
    h = hashlib.sha256()
    for name, path in sorted(_sources(package_dir or Path(hpcddf.__file__).parent).items()):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _sources(root: Path) -> dict[str, Path]:
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*.py")
             if "__pycache__" not in p.parts and p.relative_to(root).parts[0] != SITE_CONFIGS}
    spec = importlib.util.find_spec(f"hpcddf.{SITE_CONFIGS}")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for path in Path(location).iterdir():
            if path.suffix in (".py", ".toml"):
                files[f"{SITE_CONFIGS}/{path.name}"] = path
    return files


def probe(commands: Iterable[str]) -> dict[str, Any]:
    """This environment's hpcddf and where each of ``commands`` is (None: not on PATH)."""
    return {"version": hpcddf.__version__, "fingerprint": fingerprint(),
            "commands": {c: shutil.which(c) for c in commands}}


def needed_commands(argvs: Iterable[Sequence[str]]) -> list[str]:
    """The programs the stage's commands start (their argv[0]), once each, in order."""
    return list(dict.fromkeys(argv[0] for argv in argvs if argv))


def problems(found: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """What the image lacks, one phrase each: missing commands, another hpcddf."""
    out = [f"{c} is not in the image" for c, where in found.get("commands", {}).items() if not where]
    if (found.get("version"), found.get("fingerprint")) != (here["version"], here["fingerprint"]):
        out.append(f"the image has hpcddf {found.get('version')} ({found.get('fingerprint')}), "
                   f"the job hpcddf {here['version']} ({here['fingerprint']})")
    return out


def last_json(text: str) -> dict[str, Any] | None:
    """The probe's answer: the last line of its output that is a JSON object."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return dict(json.loads(line))
            except ValueError:
                continue
    return None


def main(argv: Sequence[str] | None = None) -> int:
    print(json.dumps(probe(sys.argv[1:] if argv is None else argv)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
