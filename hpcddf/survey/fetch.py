"""Bringing a survey field's data: the site's fetch command, then unpacking its archive tarballs.

The fetch is the site's own argv (``[survey] fetch``: an LTA staging script, rsync, a copy),
run on the login node through the engine's runner like every external command: argv, timeout,
a log file in the field's ``.hpcddf/`` folder. Unpacking follows ddf-pipeline's ``unpack``:
every ``*.tar``/``*.tar.gz``/``*.tgz`` in the field directory is extracted and deleted; the
Measurement Sets inside end up in the field directory. Each tarball is extracted into a
temporary directory beside it (tarfile's ``data`` filter: no absolute paths, no links out) and
its MSs renamed into place before the tarball is removed, so a tick killed half way leaves
either the tarball (unpacked again next time) or the MSs, never a half MS under its name.

A fetch that fails (the command's exit code or time-out) is worth retrying; an archive that is
not a tar file or holds no Measurement Set is not: the field fails with the reason.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hpcddf.engine.paths import unit_paths
from hpcddf.engine.sites import Site

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
FETCH_LOG = "fetch.log"


@dataclass
class FetchFailed(Exception):
    """The field's data could not be brought; ``transient``: try again at a later tick."""

    reason: str
    transient: bool

    def __str__(self) -> str:
        return self.reason


def fetch_argv(template: Sequence[str], field_id: str, dest: Path) -> tuple[str, ...]:
    """The site's fetch argv for one field ({field} and {dest} filled in, nothing else)."""
    return tuple(a.replace("{field}", field_id).replace("{dest}", str(dest)) for a in template)


def run_fetch(site: Site, field_id: str, dest: Path) -> None:
    """Run the site's fetch command for the field into ``dest``; FetchFailed if it fails."""
    from hpcddf.engine.runner import Command, RunContext, run_command
    from hpcddf.errors import StepFailed
    hidden = unit_paths(dest).hidden
    hidden.mkdir(parents=True, exist_ok=True)
    cmd = Command(fetch_argv(site.survey.fetch, field_id, dest), FETCH_LOG,
                  timeout_s=float(site.survey.fetch_timeout_s))
    ctx = RunContext(workdir=dest, log_dir=hidden, marker_dir=hidden)
    try:
        run_command(ctx, "fetch", cmd)
    except StepFailed as exc:
        why = (f"timed out after {site.survey.fetch_timeout_s} s" if exc.returncode is None
               else f"exit code {exc.returncode}")
        raise FetchFailed(f"fetch failed: {why} (log {hidden / FETCH_LOG})", transient=True) from None
    except OSError as exc:  # the command itself cannot be started: the site config is wrong
        raise FetchFailed(f"fetch command {cmd.argv[0]!r} cannot run: {exc.strerror}", transient=False) from None


def archives(dest: Path) -> list[Path]:
    return sorted(p for p in dest.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))


def unpack(dest: Path) -> list[str]:
    """Extract every archive tarball in ``dest``, MSs into place, tarball removed; the names of
    the MSs unpacked."""
    names: list[str] = []
    for archive in archives(dest):
        names += _unpack_one(archive, dest)
    return names


def _unpack_one(archive: Path, dest: Path) -> list[str]:
    with tempfile.TemporaryDirectory(prefix=f".unpack-{archive.name}-", dir=dest) as tmp:
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        except tarfile.ReadError:
            raise FetchFailed(f"archive {archive.name} cannot be unpacked: not a readable tar file",
                              transient=False) from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FetchFailed(f"archive {archive.name} cannot be unpacked: {why}", transient=False) from None
        found = measurement_sets_in(Path(tmp))
        if not found:
            raise FetchFailed(f"archive {archive.name} holds no Measurement Set (no directory with "
                              "a table.dat)", transient=False)
        for ms in found:
            target = dest / ms.name
            if target.exists():  # left by an unpack killed before it removed the tarball
                shutil.rmtree(target)
            ms.rename(target)
    archive.unlink()
    return [ms.name for ms in found]


def measurement_sets_in(root: Path) -> list[Path]:
    """Directories with a ``table.dat`` under ``root`` (not inside another one), sorted."""
    found = sorted({p.parent for p in root.rglob("table.dat")}, key=lambda p: (len(p.parts), str(p)))
    outer: list[Path] = []
    for p in found:
        if not any(o in p.parents for o in outer):
            outer.append(p)
    return sorted(outer)


def has_data(site: Site, dest: Path, field_id: str) -> bool:
    """Whether the field's MSs are there (its directory, or the site's data root)."""
    from hpcddf.engine.fields import find_measurement_sets
    data = site.data_root / field_id if site.data_root else None
    return bool(find_measurement_sets(dest, data))
