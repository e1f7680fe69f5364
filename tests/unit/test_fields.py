"""Fields: id validation, the field directory under the work root, MS discovery and MS lists."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

import hpcddf.engine.atomic
from hpcddf.engine import fields
from hpcddf.engine.fields import (
    Field,
    check_work_root,
    field_for,
    find_measurement_sets,
    make_mslists,
    small_subset,
    validate_field_id,
)
from hpcddf.engine.sites import load_site, load_site_file
from hpcddf.errors import ExitCode, FieldError

pytestmark = pytest.mark.usefixtures("isolated_env")
LOFAR = r"L[0-9]{5,7}"


# -------------------------------------------------------------------------------- field ids

@pytest.mark.parametrize("fid", ["L123456", "L12345", "L1234567"])
def test_valid_ids(fid):
    assert validate_field_id(fid, LOFAR) == fid


@pytest.mark.parametrize("fid,what", [
    ("L123/456", "a path separator"),
    ("../L123456", "a path separator"),
    ("L123\\456", "a path separator"),
    ("L123'456", "a quote"),
    ('L123"456', "a quote"),
    ("L123`id`", "a backquote"),
    ("L$(id)", "a shell character"),
    ("L123;rm", "a shell character"),
    ("L123&", "a shell character"),
    ("L123|x", "a shell character"),
    ("L1<2", "a shell character"),
    ("L1>2", "a shell character"),
    ("L12*", "a wildcard"),
    ("L12?", "a wildcard"),
    ("L1[2]", "a wildcard"),
    ("L1{2}", "a shell character"),
    ("L12!", "a shell character"),
    ("L12#", "a shell character"),
    ("~L12", "a shell character"),
    ("L12%j", "a Slurm filename pattern"),
    ("L1,L2", "a list separator"),
    ("L1=2", "an assignment"),
])
def test_ids_with_dangerous_characters(fid, what):
    with pytest.raises(FieldError, match="contains") as info:
        validate_field_id(fid, ".*")
    assert what in str(info.value)
    assert repr(fid) in str(info.value)
    assert "fix: give the bare observation id" in str(info.value)
    assert info.value.exit_code == ExitCode.CONFIG


@pytest.mark.parametrize("fid", ["L123 456", " L123456", "L123456\n", "L12\t3", "L12\x00",
                                 "L12\x1b[0m", "L12\u00a0"])
def test_ids_with_whitespace_or_control_characters(fid):
    with pytest.raises(FieldError, match="whitespace or a control character") as info:
        validate_field_id(fid, ".*")
    assert "\n" not in str(info.value)  # the id is shown as a repr: still one line


@pytest.mark.parametrize("fid", [".", "..", "-L123456", "--help"])
def test_ids_that_are_not_names(fid):
    with pytest.raises(FieldError, match="is not a name"):
        validate_field_id(fid, ".*")


def test_empty_id():
    with pytest.raises(FieldError, match="empty field id"):
        validate_field_id("", ".*")


@pytest.mark.parametrize("fid", ["L1234", "L12345678", "l123456", "X123456", "L12345a", "123456"])
def test_ids_not_matching_the_site_pattern(fid):
    with pytest.raises(FieldError, match="does not match this site's pattern") as info:
        validate_field_id(fid, LOFAR)
    assert "[fields] pattern" in str(info.value)


def test_pattern_must_match_the_whole_id():
    validate_field_id("L123456", "L[0-9]{6}")
    with pytest.raises(FieldError):
        validate_field_id("L1234567", "L[0-9]{6}")  # re.match would accept the prefix


def test_shipped_patterns():
    spider, local = load_site("spider"), load_site("local")
    validate_field_id("L654321", spider.fields.pattern)
    with pytest.raises(FieldError):
        validate_field_id("SIM1", spider.fields.pattern)
    validate_field_id("SIM1", local.fields.pattern)
    validate_field_id("L12345", local.fields.pattern)
    with pytest.raises(FieldError):
        validate_field_id("_x", local.fields.pattern)


# ---------------------------------------------------------------------------- field directory

def test_field_dir_under_work_root(site_file: Path, work_root: Path, tmp_path: Path):
    site = load_site_file(site_file)
    fld = field_for(site, "L123456")
    assert fld == Field("L123456", work_root / "L123456")
    assert fld.state_dir == work_root / "L123456" / ".hpcddf"
    assert fld.log_dir == fld.state_dir / "jobs"
    other = field_for(site, "L123456", tmp_path / "elsewhere")
    assert other.workdir == tmp_path / "elsewhere" / "L123456"
    assert not fld.workdir.exists()  # nothing is created by working out the path


def test_field_for_validates_against_the_site_pattern(site_file: Path):
    site = load_site_file(site_file)
    with pytest.raises(FieldError, match="pattern"):
        field_for(site, "SIM1")
    with pytest.raises(FieldError, match="path separator"):
        field_for(site, "../L123456")


def test_work_root_existing_or_creatable(tmp_path: Path):
    check_work_root(tmp_path)
    check_work_root(tmp_path / "a" / "b" / "c")  # missing, but its existing parent is writable
    assert not (tmp_path / "a").exists()


def test_work_root_under_a_file(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for root in (blocker, blocker / "sub"):
        with pytest.raises(FieldError, match="is not writable") as info:
            check_work_root(root)
        assert str(root) in str(info.value) and "work_root" in str(info.value)


def test_work_root_without_write_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: answer access() as for a normal user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **kw: False if Path(p) == ro
                            else real(p, m, **kw))
    try:
        with pytest.raises(FieldError, match=f"work root {ro / 'fields'} is not writable"):
            check_work_root(ro / "fields")
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------- measurement sets

def make_ms(d: Path, n: int, suffix: str = ".ms") -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"L123456_SB{i:03d}_uv{suffix}"
        p.mkdir()
        out.append(p)
    return out


def test_find_measurement_sets(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    ms = make_ms(b, 3)
    (b / "notes.ms").write_text("a file, not an MS")
    (b / "other.txt").mkdir()
    upper = b / "Z.MS"
    upper.mkdir()
    a.mkdir()
    found = find_measurement_sets(None, tmp_path / "missing", a, b)
    assert found == sorted(ms + [upper])
    assert find_measurement_sets(a) == []
    first = make_ms(a, 1)
    assert find_measurement_sets(a, b) == first  # the first directory with any wins


@pytest.mark.parametrize("n,expected", [
    (0, []), (1, [0]), (7, list(range(7))), (8, [2, 6]), (12, [2, 6, 10]),
    (24, [2, 6, 10, 14, 18, 22]), (9, [2, 6]),
])
def test_small_subset(n, expected):
    items = [Path(f"ms{i}") for i in range(n)]
    assert small_subset(items) == [items[i] for i in expected]


@pytest.fixture
def no_casacore(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fields, "flagged_fraction", lambda ms: None)


def read_lines(p: Path) -> list[str]:
    return p.read_text().splitlines()


@pytest.mark.usefixtures("no_casacore")
def test_make_mslists_writes_both_lists(tmp_path: Path):
    fld = Field("L123456", tmp_path / "L123456")
    ms = make_ms(fld.workdir, 12)
    written = make_mslists(fld, ms)
    assert written == [fld.workdir / "mslist.txt", fld.workdir / "big-mslist.txt"]
    assert read_lines(fld.workdir / "mslist.txt") == [ms[i].name for i in (2, 6, 10)]
    assert read_lines(fld.workdir / "big-mslist.txt") == [p.name for p in ms]
    assert sorted(p.name for p in fld.workdir.iterdir() if p.is_file()) == [
        "big-mslist.txt", "mslist.txt"]  # no temporary files left behind


@pytest.mark.usefixtures("no_casacore")
def test_make_mslists_small_field_lists_everything(tmp_path: Path):
    fld = Field("L1", tmp_path / "L1")
    ms = make_ms(fld.workdir, 5)
    make_mslists(fld, ms)
    assert read_lines(fld.workdir / "mslist.txt") == [p.name for p in ms]
    assert read_lines(fld.workdir / "big-mslist.txt") == [p.name for p in ms]


@pytest.mark.usefixtures("no_casacore")
def test_make_mslists_outside_the_field_dir_uses_absolute_paths(tmp_path: Path):
    fld = Field("L1", tmp_path / "work" / "L1")
    fld.workdir.mkdir(parents=True)
    ms = make_ms(tmp_path / "data" / "L1", 8)
    make_mslists(fld, ms, "small.txt", None)
    assert read_lines(fld.workdir / "small.txt") == [str(ms[2]), str(ms[6])]
    assert not (fld.workdir / "big-mslist.txt").exists()


@pytest.mark.usefixtures("no_casacore")
def test_make_mslists_keeps_user_lists(tmp_path: Path):
    fld = Field("L1", tmp_path / "L1")
    ms = make_ms(fld.workdir, 10)
    mine = fld.workdir / "mslist.txt"
    mine.write_text("my_choice.ms\n")
    written = make_mslists(fld, ms)
    assert written == [fld.workdir / "big-mslist.txt"]
    assert mine.read_text() == "my_choice.ms\n"
    assert make_mslists(fld, ms) == []  # both exist now: nothing rewritten
    assert len(read_lines(fld.workdir / "big-mslist.txt")) == 10


@pytest.mark.usefixtures("no_casacore")
def test_make_mslists_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fld = Field("L1", tmp_path / "L1")
    ms = make_ms(fld.workdir, 8)
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        # the whole content is already in the temporary file in the same directory
        assert Path(src).parent == Path(dst).parent
        assert not Path(dst).exists()
        seen.append((Path(dst).name, Path(src).read_text()))
        return real_replace(src, dst)
    monkeypatch.setattr(hpcddf.engine.atomic.os, "replace", replace)
    make_mslists(fld, ms)
    assert seen == [("mslist.txt", f"{ms[2].name}\n{ms[6].name}\n"),
                    ("big-mslist.txt", "".join(f"{p.name}\n" for p in ms))]


@pytest.mark.usefixtures("no_casacore")
def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fld = Field("L1", tmp_path / "L1")
    ms = make_ms(fld.workdir, 8)

    def boom(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(hpcddf.engine.atomic.os, "replace", boom)
    with pytest.raises(OSError):
        make_mslists(fld, ms)
    assert sorted(p.name for p in fld.workdir.iterdir() if p.is_file()) == []


def test_make_mslists_leaves_out_flagged_ms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fld = Field("L1", tmp_path / "L1")
    ms = make_ms(fld.workdir, 4)
    fractions = {ms[0].name: 0.1, ms[1].name: 0.95, ms[2].name: 0.8, ms[3].name: None}
    monkeypatch.setattr(fields, "flagged_fraction", lambda p: fractions[p.name])
    make_mslists(fld, ms)
    assert read_lines(fld.workdir / "big-mslist.txt") == [ms[0].name, ms[2].name, ms[3].name]


def test_make_mslists_all_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fld = Field("L1", tmp_path / "L1")
    ms = make_ms(fld.workdir, 3)
    monkeypatch.setattr(fields, "flagged_fraction", lambda p: 1.0)
    with pytest.raises(FieldError, match="no usable measurement sets for field L1"):
        make_mslists(fld, ms)
    assert not (fld.workdir / "mslist.txt").exists()


def test_flagged_fraction_without_casacore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A login node without python-casacore: no flag fraction, not an error. Where casacore is
    installed it is hidden (None in sys.modules makes every import of it fail)."""
    monkeypatch.setitem(sys.modules, "casacore", None)
    monkeypatch.setitem(sys.modules, "casacore.tables", None)
    with pytest.raises(ImportError):
        importlib.import_module("casacore.tables")
    assert fields.flagged_fraction(tmp_path) is None
