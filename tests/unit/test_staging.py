"""Scratch paths and resumable staging copies on real files in tmp_path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import hpcddf.engine.staging as staging
from hpcddf.engine.sites import NodeSection, Site
from hpcddf.engine.staging import (
    PART_SUFFIX,
    Scratch,
    clean_scratch,
    expand_node_path,
    prepare_scratch,
    stage_in,
    stage_out,
)
from hpcddf.errors import StagingError


def make_site(scratch_dir: str) -> Site:
    return Site(name="test", path="test.toml", node=NodeSection(scratch_dir=scratch_dir))


def make_ms(root: Path) -> Path:
    """A Measurement-Set-like directory tree: table files, a subtable and a relative symlink."""
    ms = root / "L123456_SB000.ms"
    (ms / "ANTENNA").mkdir(parents=True)
    (ms / "table.dat").write_bytes(b"main table" * 100)
    (ms / "table.f0").write_bytes(os.urandom(4096))
    (ms / "ANTENNA" / "table.dat").write_bytes(b"antennas")
    (ms / "table.info").symlink_to("table.dat")
    return ms


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(PART_SUFFIX)]


# ------------------------------------------------------------------------- node paths

@pytest.mark.parametrize("pattern, env, expected", [
    ("$TMPDIR/hpcddf-$SLURM_JOB_ID", {"TMPDIR": "/local/tmp", "SLURM_JOB_ID": "42"},
     "/local/tmp/hpcddf-42"),
    ("${TMPDIR}/x${SLURM_JOB_ID}y", {"TMPDIR": "/t", "SLURM_JOB_ID": "7"}, "/t/x7y"),
    ("${TMPDIR:-/tmp}/hpcddf-scratch-$USER", {"USER": "ann"}, "/tmp/hpcddf-scratch-ann"),
    ("${TMPDIR:-/tmp}/s", {"TMPDIR": "/nvme"}, "/nvme/s"),
    ("${TMPDIR:-/tmp}/s", {"TMPDIR": ""}, "/tmp/s"),
    ("${LOCAL:-$HOME/scratch}/c", {"HOME": "/home/ann"}, "/home/ann/scratch/c"),
    ("~/scratch", {"HOME": "/home/ann"}, "/home/ann/scratch"),
    ("/fixed/path", {}, "/fixed/path"),
])
def test_expand_node_path(pattern: str, env: dict[str, str], expected: str) -> None:
    assert expand_node_path(pattern, env) == Path(expected)


@pytest.mark.parametrize("pattern, env, name", [
    ("$TMPDIR/hpcddf-$SLURM_JOB_ID", {"TMPDIR": "/t"}, "SLURM_JOB_ID"),
    ("${SCRATCH_lofar}/cache", {}, "SCRATCH_lofar"),
    ("$TMPDIR/x", {"TMPDIR": ""}, "TMPDIR"),
])
def test_expand_node_path_unset_variable_is_an_error(pattern: str, env: dict[str, str],
                                                     name: str) -> None:
    with pytest.raises(StagingError) as exc:
        expand_node_path(pattern, env)
    assert f"${name} is not set" in exc.value.message
    assert exc.value.hint and f"${{{name}:-/tmp}}" in exc.value.hint


def test_expand_node_path_rejects_unsupported_forms() -> None:
    with pytest.raises(StagingError, match="unsupported"):
        expand_node_path("${TMPDIR:?no tmp}/x", {"TMPDIR": "/t"})


# ---------------------------------------------------------------------------- scratch

def test_prepare_scratch_makes_cache_dir_and_is_repeatable(tmp_path: Path) -> None:
    site = make_site("$TMPDIR/hpcddf-$SLURM_JOB_ID")
    env = {"TMPDIR": str(tmp_path), "SLURM_JOB_ID": "42"}
    scratch = prepare_scratch(site, "P123+45", env)
    assert scratch == Scratch(root=tmp_path / "hpcddf-42",
                              cache_dir=tmp_path / "hpcddf-42" / "P123+45" / "cache")
    assert scratch.cache_dir.is_dir()
    assert scratch.field_dir == tmp_path / "hpcddf-42" / "P123+45"
    (scratch.cache_dir / "kept").write_text("x")
    assert prepare_scratch(site, "P123+45", env) == scratch
    assert (scratch.cache_dir / "kept").exists()


def test_prepare_scratch_unset_variable(tmp_path: Path) -> None:
    with pytest.raises(StagingError, match=r"\$SLURM_JOB_ID is not set"):
        prepare_scratch(make_site("$TMPDIR/hpcddf-$SLURM_JOB_ID"), "P1", {"TMPDIR": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field_id", ["", "..", "a/b"])
def test_prepare_scratch_rejects_field_ids_that_are_not_one_name(tmp_path: Path,
                                                                 field_id: str) -> None:
    with pytest.raises(StagingError):
        prepare_scratch(make_site(str(tmp_path / "s")), field_id, {})


def test_prepare_scratch_rejects_relative_paths(tmp_path: Path) -> None:
    with pytest.raises(StagingError, match="relative"):
        prepare_scratch(make_site("$SUB/scratch"), "P1", {"SUB": "relative"})


def test_prepare_scratch_unwritable_disk_is_a_staging_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StagingError, match="cannot create scratch"):
        prepare_scratch(make_site(str(blocker / "scratch")), "P1", {})


def test_clean_scratch_removes_the_field_and_an_empty_root(tmp_path: Path) -> None:
    site = make_site(str(tmp_path / "root"))
    a = prepare_scratch(site, "A", {})
    b = prepare_scratch(site, "B", {})
    (a.cache_dir / "PSF").mkdir()
    (a.cache_dir / "PSF" / "psf.npy").write_bytes(b"x")
    clean_scratch(a)
    assert not a.field_dir.exists() and b.field_dir.exists()
    clean_scratch(b)
    assert not (tmp_path / "root").exists()
    clean_scratch(b)  # already gone: nothing to do


def test_clean_scratch_refuses_a_scratch_not_made_by_prepare(tmp_path: Path) -> None:
    with pytest.raises(StagingError):
        clean_scratch(Scratch(root=tmp_path / "root", cache_dir=tmp_path / "elsewhere" / "cache"))
    assert tmp_path.exists()


# ---------------------------------------------------------------------------- copying

def test_stage_in_copies_tree_then_only_what_changed(tmp_path: Path) -> None:
    ms = make_ms(tmp_path / "data")
    extra = tmp_path / "data" / "mslist.txt"
    extra.write_text("L123456_SB000.ms\n")
    dest = tmp_path / "scratch" / "inputs"

    copied = stage_in([ms, extra], dest)
    assert sorted(copied) == sorted([dest / ms.name / "table.dat", dest / ms.name / "table.f0",
                                     dest / ms.name / "ANTENNA" / "table.dat",
                                     dest / ms.name / "table.info", dest / "mslist.txt"])
    assert files_under(dest / ms.name) == files_under(ms)
    assert (dest / ms.name / "table.info").is_symlink()
    assert os.readlink(dest / ms.name / "table.info") == "table.dat"
    for src, dst in ((ms / "table.f0", dest / ms.name / "table.f0"), (extra, dest / extra.name)):
        assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns

    assert stage_in([ms, extra], dest) == []  # a requeue on the same node copies nothing

    changed = ms / "ANTENNA" / "table.dat"
    changed.write_bytes(b"antennas, flagged")
    assert stage_in([ms, extra], dest) == [dest / ms.name / "ANTENNA" / "table.dat"]
    assert (dest / ms.name / "ANTENNA" / "table.dat").read_bytes() == b"antennas, flagged"

    st = extra.stat()  # same size, only the mtime differs
    os.utime(extra, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert stage_in([ms, extra], dest) == [dest / "mslist.txt"]
    assert partials(dest) == []


def test_stage_in_replaces_half_copied_files_left_by_a_killed_job(tmp_path: Path) -> None:
    ms = make_ms(tmp_path / "data")
    dest = tmp_path / "scratch"
    stage_in([ms], dest)
    target = dest / ms.name / "table.f0"
    target.write_bytes(b"truncat")  # a file at the final name that is not complete
    leftover = target.with_name(f".table.f0{PART_SUFFIX}")
    leftover.write_bytes(b"partial")
    leftover.chmod(0o444)
    assert stage_in([ms], dest) == [target]
    assert target.read_bytes() == (ms / "table.f0").read_bytes()
    assert partials(dest) == []


def test_stage_in_follows_a_top_level_symlink(tmp_path: Path) -> None:
    ms = make_ms(tmp_path / "data")
    link = tmp_path / "links" / ms.name
    link.parent.mkdir()
    link.symlink_to(ms)
    stage_in([link], tmp_path / "scratch")
    assert (tmp_path / "scratch" / ms.name).is_dir()
    assert not (tmp_path / "scratch" / ms.name).is_symlink()
    assert files_under(tmp_path / "scratch" / ms.name) == files_under(ms)


def test_full_destination_fails_before_copying(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    ms = make_ms(tmp_path / "data")
    dest = tmp_path / "scratch"
    monkeypatch.setattr(staging, "free_bytes", lambda path: 1000)
    with pytest.raises(StagingError) as exc:
        stage_in([ms], dest)
    assert exc.value.message.startswith(f"scratch {dest} has 0.0 MB free, needs ")
    assert exc.value.hint and "scratch_dir" in exc.value.hint
    assert not dest.exists() or files_under(dest) == {}


def test_space_check_counts_only_bytes_still_to_copy(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ms = make_ms(tmp_path / "data")
    dest = tmp_path / "scratch"
    stage_in([ms], dest)
    (ms / "ANTENNA" / "table.dat").write_bytes(b"x" * 100)
    monkeypatch.setattr(staging, "free_bytes", lambda path: 100)  # less than the whole MS
    assert stage_in([ms], dest) == [dest / ms.name / "ANTENNA" / "table.dat"]


def test_disk_filling_during_a_copy_leaves_no_partial_file(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ms = make_ms(tmp_path / "data")
    dest = tmp_path / "scratch"

    def fill_up(src: Path, tmp: Path) -> None:
        if src.name == "table.f0":
            tmp.write_bytes(src.read_bytes()[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        real_copy(src, tmp)

    real_copy = staging._copy_bytes
    monkeypatch.setattr(staging, "_copy_bytes", fill_up)
    with pytest.raises(StagingError) as exc:
        stage_in([ms], dest)
    assert "ran out of space while copying" in exc.value.message
    assert "table.f0" in exc.value.message
    assert not (dest / ms.name / "table.f0").exists()
    assert partials(dest) == []

    monkeypatch.setattr(staging, "_copy_bytes", real_copy)  # space freed: the rest is copied
    # what was done before the failure is kept; the failed file and those after it follow
    assert stage_in([ms], dest) == [dest / ms.name / "table.f0", dest / ms.name / "table.info"]
    assert files_under(dest / ms.name) == files_under(ms)


def test_stage_out_copies_products_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "scratch" / "cache"
    cache.mkdir(parents=True)
    product = cache / "image_full_ampphase_di_m.NS.app.restored.fits"
    product.write_bytes(b"SIMPLE" * 10)
    shared = tmp_path / "field"
    assert stage_out([product], shared) == [shared / product.name]
    assert stage_out([product], shared) == []
    product.write_bytes(b"SIMPLE" * 20)
    monkeypatch.setattr(staging, "free_bytes", lambda path: 0)
    with pytest.raises(StagingError, match=rf"^destination {shared} has 0.0 MB free"):
        stage_out([product], shared)


def test_missing_source_and_nested_destination_are_errors(tmp_path: Path) -> None:
    with pytest.raises(StagingError, match="does not exist"):
        stage_in([tmp_path / "missing.ms"], tmp_path / "scratch")
    ms = make_ms(tmp_path / "data")
    with pytest.raises(StagingError, match="inside it"):
        stage_in([ms], ms / "copy")
    other = make_ms(tmp_path / "other")
    with pytest.raises(StagingError, match="two inputs"):
        stage_in([ms, other], tmp_path / "scratch")


def test_two_jobs_of_the_same_field_name_get_their_own_scratch(tmp_path: Path) -> None:
    """Two work roots may both have a field SIM1 running on one machine (local site)."""
    site = make_site(str(tmp_path / "scratch"))
    a = prepare_scratch(site, "SIM1", {}, tag="101")
    b = prepare_scratch(site, "SIM1", {}, tag="202")
    assert a.cache_dir != b.cache_dir and a.cache_dir.is_dir() and b.cache_dir.is_dir()
    clean_scratch(a)
    assert not a.field_dir.exists() and b.cache_dir.is_dir()
    with pytest.raises(StagingError):
        prepare_scratch(site, "SIM1", {}, tag="../x")
