"""Fields: the observation id a user types, its working directory and its MS lists.

A field id ends up in paths, job names and container arguments, so it is checked twice:
first for characters that could escape a path or a shell (a clear message for each), then
against the site's pattern.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hpcddf.engine.atomic import write_text_atomic
from hpcddf.engine.paths import unit_paths
from hpcddf.engine.sites import Site
from hpcddf.errors import FieldError

log = logging.getLogger(__name__)

_FORBIDDEN = {
    "/": "a path separator", "\\": "a path separator", "'": "a quote", '"': "a quote",
    "`": "a backquote", "$": "a shell character", ";": "a shell character",
    "&": "a shell character", "|": "a shell character", "<": "a shell character",
    ">": "a shell character", "*": "a wildcard", "?": "a wildcard", "(": "a shell character",
    ")": "a shell character", "{": "a shell character", "}": "a shell character",
    "[": "a wildcard", "]": "a wildcard", "!": "a shell character", "#": "a shell character",
    "~": "a shell character", "%": "a Slurm filename pattern", ",": "a list separator",
    "=": "an assignment",
}
MS_SUFFIXES = (".ms", ".MS")


def validate_field_id(field_id: str, pattern: str) -> str:
    """Return ``field_id`` if it is safe and matches the site's pattern, else raise FieldError."""
    if not field_id:
        raise FieldError("empty field id", "give the observation id, e.g. L123456")
    for ch in field_id:
        if ch.isspace() or not ch.isprintable():
            raise FieldError(f"field id {field_id!r} contains whitespace or a control character",
                             "give the bare observation id, e.g. L123456")
        if ch in _FORBIDDEN:
            raise FieldError(f"field id {field_id!r} contains {_FORBIDDEN[ch]} {ch!r}",
                             "give the bare observation id, e.g. L123456")
    if field_id in (".", "..") or field_id.startswith("-"):
        raise FieldError(f"field id {field_id!r} is not a name", "give the observation id, e.g. L123456")
    if re.fullmatch(pattern, field_id) is None:
        raise FieldError(f"field id {field_id!r} does not match this site's pattern {pattern!r}",
                         "check the observation id, or change [fields] pattern in the site config")
    return field_id


@dataclass(frozen=True)
class Field:
    """One observation being reduced: its id and where its files live."""

    id: str
    workdir: Path

    @property
    def state_dir(self) -> Path:
        return unit_paths(self.workdir).hidden

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "jobs"


def field_for(site: Site, field_id: str, work_root: Path | None = None) -> Field:
    """The field ``field_id`` at ``site``: validated id, directory under the work root."""
    validate_field_id(field_id, site.fields.pattern)
    root = work_root if work_root is not None else site.work_root
    workdir = root / field_id
    if workdir.is_symlink():
        target = workdir.resolve()
        if not target.is_relative_to(root.resolve()):
            raise FieldError(f"field directory {workdir} is a symlink to {target}, outside the work root {root}",
                             "move the field under the work root, or set the work root (--work-root) to where it is")
    return Field(id=field_id, workdir=workdir)


def check_work_root(root: Path) -> None:
    """The work root must exist (or be creatable) and be writable, before anything is queued."""
    probe = root
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise FieldError(f"work root {root} is not writable",
                         "set [paths] work_root in the site config (or --work-root) to a directory you can write")


def find_measurement_sets(*dirs: Path | None) -> list[Path]:
    """MS directories (``*.ms``/``*.MS``) in the first of ``dirs`` that has any, sorted by name."""
    for d in dirs:
        if d is None or not d.is_dir():
            continue
        found = sorted(p for p in d.iterdir() if p.suffix in MS_SUFFIXES and p.is_dir())
        if found:
            return found
    return []


def small_subset(ms: list[Path]) -> list[Path]:
    """The small MS list: a regular subset of the subbands, as make_mslists does.

    With a full LOFAR band (>= 8 subbands) that is every 4th from the third (the survey's
    choice, a sixth of the band spread evenly); with fewer, every MS.
    """
    return ms[2::4] if len(ms) >= 8 else list(ms)


def flagged_fraction(ms: Path) -> float | None:
    """Fraction of flagged data, or None when python-casacore is not installed here."""
    try:
        from casacore import tables  # type: ignore[import-not-found]
    except ImportError:
        return None
    with tables.table(str(ms), ack=False) as t:
        # a sample of rows is enough to tell a dead subband, and keeps the login node light
        step = max(1, t.nrows() // 20000)
        flags = t.getcol("FLAG", rowincr=step)
    return float(flags.mean()) if flags.size else 1.0


def make_mslists(field: Field, ms: list[Path], small_name: str = "mslist.txt",
                 big_name: str | None = "big-mslist.txt", max_flagged: float = 0.8) -> list[Path]:
    """Write the small and full MS lists into the field directory (atomically).

    MSs flagged more than ``max_flagged`` are left out, as make_mslists does; without
    python-casacore on this node the flag check is skipped and said so in the log.
    Existing lists are the user's and are kept.
    """
    written = []
    usable = []
    for p in ms:
        frac = flagged_fraction(p)
        if frac is None:
            log.info("python-casacore not installed: flag fractions of the MSs not checked")
        elif frac > max_flagged:
            log.warning("leaving %s out of the MS lists: %.0f%% flagged", p.name, 100 * frac)
            continue
        usable.append(p)
    if not usable:
        raise FieldError(f"no usable measurement sets for field {field.id}",
                         "every MS is more than 80% flagged: check the data")
    lists = [(small_name, small_subset(usable))]
    if big_name:
        lists.append((big_name, usable))
    for name, items in lists:
        target = field.workdir / name
        if target.exists():
            continue
        write_text_atomic(target, "".join(f"{_relative(p, field.workdir)}\n" for p in items))
        written.append(target)
    return written


def _relative(p: Path, base: Path) -> str:
    try:
        return str(p.relative_to(base))
    except ValueError:
        return str(p)
