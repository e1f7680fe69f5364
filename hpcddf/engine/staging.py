"""Node-local scratch for the DDFacet cache and inputs, and copies to and from it.

The DDFacet cache grows to about 1 TB for a full field and is read and written all the time, so
ddf-pipeline's maintainer keeps it on fast node-attached disk while the Measurement Sets stay on
the shared file system (ddf-pipeline #47). ``scratch_dir`` in the site file names that disk with
``$VARS`` that only exist on the node (``$TMPDIR``, ``$SLURM_JOB_ID``), so it is expanded here,
in the job, and an unset variable is an error rather than a path under ``/``.

Copies are made to be interrupted: a job killed at its walltime and requeued on the same node
must neither trust a half-copied file nor copy a terabyte again. Every file is written under a
temporary name and renamed when complete, and a file whose size and mtime already match is
skipped.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from hpcddf.engine.sites import Site
from hpcddf.errors import StagingError

log = logging.getLogger(__name__)

GB = 2**30
PART_SUFFIX = ".hpcddf-part"  # temporary name of a file being copied: .<name>.hpcddf-part
_VAR = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+)|(\{[^}]*\}?))")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


# ----------------------------------------------------------------------------- node paths

def expand_node_path(pattern: str, env: Mapping[str, str]) -> Path:
    """Expand ``$VAR``, ``${VAR}``, ``${VAR:-default}`` and a leading ``~`` from ``env``.

    Unlike ``os.path.expandvars`` an unset (or empty) variable is an error: ``$TMPDIR/x`` with
    no ``TMPDIR`` would otherwise become ``/x`` or the literal text ``$TMPDIR/x``.
    """
    def sub(m: re.Match[str]) -> str:
        braced, default, bare, bad = m.groups()
        if bad is not None:
            raise StagingError(f"{pattern!r}: unsupported expansion ${bad}",
                               "use $VAR, ${VAR} or ${VAR:-default} in [node] scratch_dir")
        name = braced or bare
        value = env.get(name, "")
        if value:
            return value
        if default is not None:
            return _VAR.sub(sub, default)
        raise StagingError(f"{pattern!r}: ${name} is not set on this node",
                           f"set {name} in the job environment, or give a default in [node] "
                           f"scratch_dir, e.g. ${{{name}:-/tmp}}")

    text = _VAR.sub(sub, pattern)
    if text == "~" or text.startswith("~/"):
        home = env.get("HOME")
        if not home:
            raise StagingError(f"{pattern!r}: ~ needs $HOME, which is not set on this node",
                               "use an absolute path in [node] scratch_dir")
        text = home + text[1:]
    return Path(text)


@dataclass(frozen=True)
class Scratch:
    """A field's scratch on this node: ``cache_dir`` is always ``root/<field_id>/cache``."""

    root: Path
    cache_dir: Path

    @property
    def field_dir(self) -> Path:
        return self.cache_dir.parent


def _check_field_id(field_id: str) -> None:
    if not field_id or field_id in (".", "..") or "/" in field_id or "\0" in field_id:
        raise StagingError(f"field id {field_id!r} cannot name a scratch directory",
                           "use the field's id, e.g. P123+45")


def prepare_scratch(site: Site, field_id: str, env: Mapping[str, str] | None = None,
                    tag: str | None = None) -> Scratch:
    """Make ``<scratch_dir>/<field_id>[.<tag>]/cache`` on this node.

    The cache directory is created here because DDFacet 0.9.1 does not create it, and
    ddf-pipeline silently falls back to ``.`` (the shared file system) when it is missing.
    ``tag`` (the job id) keeps two runs of a field with the same name, from different work
    roots on one machine, from sharing (and cleaning) each other's scratch.
    """
    env = os.environ if env is None else env
    _check_field_id(field_id)
    root = expand_node_path(site.node.scratch_dir, env)
    if not root.is_absolute():
        raise StagingError(f"scratch_dir {site.node.scratch_dir!r} expands to the relative path "
                           f"{root}", "make [node] scratch_dir an absolute path")
    if tag is not None:
        _check_field_id(tag)
    cache = root / (f"{field_id}.{tag}" if tag else field_id) / "cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StagingError(f"cannot create scratch {cache}: {exc.strerror or exc}",
                           "check [node] scratch_dir in the site file and that the disk is "
                           "writable on this node") from None
    log.info("scratch for %s at %s", field_id, cache.parent)
    return Scratch(root=root, cache_dir=cache)


def clean_scratch(scratch: Scratch) -> None:
    """Remove the field's scratch directory (and ``root`` if nothing else is left in it)."""
    field_dir = scratch.field_dir
    if field_dir.parent != scratch.root:
        raise StagingError(f"{scratch.cache_dir} is not <root>/<field>/cache under {scratch.root}",
                           "pass the Scratch that prepare_scratch returned")
    try:
        shutil.rmtree(field_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StagingError(f"cannot remove scratch {field_dir}: {exc}",
                           f"remove it by hand: rm -rf {field_dir}") from None
    try:
        scratch.root.rmdir()
    except OSError:
        pass  # other fields still use it, or it is gone already
    log.info("removed scratch %s", field_dir)


# -------------------------------------------------------------------------------- copying

@dataclass(frozen=True)
class _Item:
    """One thing to create under dest: a directory, a file (with its size) or a symlink."""

    src: Path
    dst: Path
    kind: str  # "dir", "file" or "link"
    size: int = 0


def free_bytes(path: Path) -> int:
    """Bytes a user may still write on the file system of ``path`` (or its nearest parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _size_text(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 2**20:.1f} MB"


def _walk(src: Path, dst: Path) -> list[_Item]:
    """Everything under ``src`` (itself included) mapped to ``dst``; symlinks stay symlinks."""
    st = src.lstat()
    if src.is_symlink():
        return [_Item(src, dst, "link")]
    if not src.is_dir():
        return [_Item(src, dst, "file", st.st_size)]
    items = [_Item(src, dst, "dir")]
    with os.scandir(src) as it:
        for entry in sorted(it, key=lambda e: e.name):
            items.extend(_walk(Path(entry.path), dst / entry.name))
    return items


def _plan(sources: Sequence[Path], dest: Path) -> list[_Item]:
    items: list[_Item] = []
    names: set[str] = set()
    dest_real = dest.resolve()
    for src in map(Path, sources):
        if not src.exists() and not src.is_symlink():
            raise StagingError(f"cannot stage {src}: it does not exist", "check the input paths")
        if src.name in names:
            raise StagingError(f"two inputs are named {src.name}", "stage them into different "
                               "directories")
        names.add(src.name)
        if src.is_dir() and not src.is_symlink() and dest_real.is_relative_to(src.resolve()):
            raise StagingError(f"cannot copy {src} into {dest}, which is inside it",
                               "choose a destination outside the source")
        try:
            # a top-level symlink (e.g. to an MS on another disk) is staged as what it points to
            items.extend(_walk(src.resolve() if src.is_symlink() else src, dest / src.name))
        except OSError as exc:
            raise StagingError(f"cannot read {src}: {exc}", "check the input paths") from None
    return items


def _up_to_date(item: _Item) -> bool:
    """Done by an earlier copy: same size and mtime (copy2 keeps mtime), or the same link."""
    try:
        if item.kind == "link":
            return item.dst.is_symlink() and os.readlink(item.dst) == os.readlink(item.src)
        if item.kind == "dir":
            return item.dst.is_dir() and not item.dst.is_symlink()
        d, s = item.dst.lstat(), item.src.stat()
    except OSError:
        return False
    return (item.dst.is_file() and not item.dst.is_symlink()
            and d.st_size == s.st_size and d.st_mtime_ns == s.st_mtime_ns)


def _copy_bytes(src: Path, tmp: Path) -> None:
    """The data copy itself (a separate function so a full disk can be simulated in tests)."""
    shutil.copyfile(src, tmp, follow_symlinks=True)


def _copy_file(src: Path, dst: Path) -> None:
    """Copy under a temporary name, flush, keep mode and mtime, then rename into place."""
    tmp = dst.with_name(f".{dst.name}{PART_SUFFIX}")
    tmp.unlink(missing_ok=True)  # left by a copy that was killed
    try:
        _copy_bytes(src, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        shutil.copystat(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _make(item: _Item) -> None:
    if item.kind == "dir":
        item.dst.mkdir(parents=True, exist_ok=True)
    elif item.kind == "link":
        item.dst.unlink(missing_ok=True)
        os.symlink(os.readlink(item.src), item.dst)
    else:
        _copy_file(item.src, item.dst)


def _space_fix(dest: Path, label: str) -> str:
    if label == "scratch":
        return (f"free space under {dest}, or point [node] scratch_dir at a larger disk in the "
                "site file")
    return f"free space under {dest} (or ask for more quota) and rerun"


def _check_space(todo: list[_Item], dest: Path, label: str) -> None:
    """Fail before copying anything if the bytes still to copy cannot fit."""
    need = sum(i.size for i in todo)
    if need == 0:
        return
    free = free_bytes(dest)
    if free < need:
        raise StagingError(f"{label} {dest} has {_size_text(free)} free, needs {_size_text(need)}",
                           _space_fix(dest, label))


def _copy_into(sources: Sequence[Path], dest: Path, label: str) -> list[Path]:
    dest = Path(dest)
    items = _plan(sources, dest)
    todo = [i for i in items if not _up_to_date(i)]
    _check_space(todo, dest, label)
    copied: list[Path] = []
    current = dest
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for item in todo:
            current = item.src
            _make(item)
            if item.kind != "dir":
                copied.append(item.dst)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise StagingError(f"{label} {dest} ran out of space while copying {current}",
                               _space_fix(dest, label)) from None
        raise StagingError(f"cannot copy {current} into {dest}: {exc}",
                           f"check that {dest} is writable and the inputs readable") from None
    log.info("copied %d of %d files into %s (%d up to date)", len(copied),
             sum(i.kind != "dir" for i in items), dest,
             sum(i.kind != "dir" for i in items) - len(copied))
    return copied


def stage_in(sources: Sequence[Path], dest: Path) -> list[Path]:
    """Copy files or whole directories (an MS) into ``dest`` on scratch; return what was copied.

    Files already there from an earlier attempt (same size and mtime) are not copied again.
    """
    return _copy_into(sources, dest, "scratch")


def stage_out(sources: Sequence[Path], dest: Path) -> list[Path]:
    """Copy products from scratch back to ``dest`` (shared storage); return what was copied."""
    return _copy_into(sources, dest, "destination")
