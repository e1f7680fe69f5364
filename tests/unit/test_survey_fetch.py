"""Bringing a survey field's data: the site's fetch argv through the runner, and unpacking
LOFAR archive tarballs as ddf-pipeline's unpack does (MSs into place, tarball removed), with
what is worth retrying told apart from what is not."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

from hpcddf.engine.sites import load_site_file
from hpcddf.survey.fetch import FetchFailed, fetch_argv, has_data, run_fetch, unpack
from tests._survey import make_archive


def test_argv_template_fills_field_and_dest_only() -> None:
    argv = fetch_argv(["rsync", "-a", "lta:/{field}/{x}", "{dest}/"], "L123456", Path("/w/L123456"))
    assert argv == ("rsync", "-a", "lta:/L123456/{x}", "/w/L123456/")


@pytest.mark.parametrize("fmt,suffix", [("w", ".tar"), ("w:gz", ".tar.gz")])
def test_unpack_puts_each_ms_in_place_and_removes_the_tarball(tmp_path: Path, fmt: str, suffix: str) -> None:
    make_archive(tmp_path / f"L1_SB000{suffix}", "L1_SB000_uv.MS", fmt=fmt)
    make_archive(tmp_path / f"L1_SB001{suffix}", "scratch/deep/L1_SB001_uv.MS", fmt=fmt)
    assert unpack(tmp_path) == ["L1_SB000_uv.MS", "L1_SB001_uv.MS"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L1_SB000_uv.MS", "L1_SB001_uv.MS"]
    assert (tmp_path / "L1_SB001_uv.MS" / "table.f0").stat().st_size == 64
    assert unpack(tmp_path) == []  # nothing left to unpack


def test_an_ms_left_by_a_killed_unpack_is_replaced(tmp_path: Path) -> None:
    half = tmp_path / "L1_SB000_uv.MS"
    half.mkdir()
    (half / "table.dat").write_text("half")
    make_archive(tmp_path / "L1_SB000.tar", "L1_SB000_uv.MS")
    unpack(tmp_path)
    assert (half / "table.dat").read_bytes() == b"table" and (half / "table.f0").exists()


def test_a_broken_archive_or_one_without_an_ms_is_permanent(tmp_path: Path) -> None:
    (tmp_path / "L1_SB000.tar").write_bytes(b"<html>502 Bad Gateway</html>")
    with pytest.raises(FetchFailed, match="L1_SB000.tar cannot be unpacked") as exc:
        unpack(tmp_path)
    assert not exc.value.transient and (tmp_path / "L1_SB000.tar").exists()
    (tmp_path / "L1_SB000.tar").unlink()
    with tarfile.open(tmp_path / "L1_SB001.tar", "w") as tf:
        tf.add(__file__, arcname="README")
    with pytest.raises(FetchFailed, match="holds no Measurement Set") as exc:
        unpack(tmp_path)
    assert not exc.value.transient
    assert [p.name for p in tmp_path.iterdir()] == ["L1_SB001.tar"]  # no temporary left


def test_a_member_outside_the_field_directory_is_refused(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "L1_SB000.tar", "w") as tf:
        info = tarfile.TarInfo("../../escaped/table.dat")
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(FetchFailed, match="cannot be unpacked"):
        unpack(tmp_path)
    assert not (tmp_path.parent.parent / "escaped").exists()


@pytest.fixture
def fetch_site(write_site, tmp_path: Path):  # noqa: ANN001, ANN201
    def make(argv: list[str], timeout: int = 30):  # noqa: ANN202
        path = write_site()
        path.write_text(path.read_text() + f"\n[survey]\nfetch = {json.dumps(argv)}\nfetch_timeout_s = {timeout}\n")
        return load_site_file(path)
    return make


def test_the_fetch_runs_through_the_runner_with_its_log(fetch_site, tmp_path: Path) -> None:  # noqa: ANN001
    src = make_archive(tmp_path / "L100001_SB000.tar", "L100001_SB000_uv.MS")
    site = fetch_site([sys.executable, "-c", f"import shutil; shutil.copy('{src}', '{{dest}}'); print('{{field}} copied')"])
    dest = tmp_path / "work" / "L100001"
    dest.mkdir(parents=True)
    run_fetch(site, "L100001", dest)
    assert "L100001 copied" in (dest / ".hpcddf" / "fetch.log").read_text()
    unpack(dest)
    assert has_data(site, dest, "L100001")


def test_a_failing_or_hanging_fetch_is_transient_and_names_its_log(fetch_site, tmp_path: Path) -> None:  # noqa: ANN001
    dest = tmp_path / "L100002"
    dest.mkdir()
    site = fetch_site([sys.executable, "-c", "import sys; print('LTA says no'); sys.exit(3)  # {field}"])
    with pytest.raises(FetchFailed, match="exit code 3") as exc:
        run_fetch(site, "L100002", dest)
    assert exc.value.transient and "fetch.log" in exc.value.reason
    assert "LTA says no" in (dest / ".hpcddf" / "fetch.log").read_text()
    site = fetch_site([sys.executable, "-c", "import time; time.sleep(60)  # {field}"], timeout=1)
    with pytest.raises(FetchFailed, match="timed out after 1 s") as exc:
        run_fetch(site, "L100002", dest)
    assert exc.value.transient


def test_a_fetch_command_that_cannot_start_is_permanent(fetch_site, tmp_path: Path) -> None:  # noqa: ANN001
    site = fetch_site(["/no/such/lta-stage", "{field}"])
    with pytest.raises(FetchFailed, match="cannot run") as exc:
        run_fetch(site, "L100003", tmp_path)
    assert not exc.value.transient


def test_old_tick_job_folders_are_pruned(tmp_path: Path) -> None:
    import os
    import time

    from hpcddf.survey.run import prune_old
    old, new = tmp_path / "1001", tmp_path / "1002"
    for d in (old, new):
        d.mkdir()
        (d / "1001_log.out").write_text("tick")
    week_ago = time.time() - 8 * 86400
    os.utime(old, (week_ago, week_ago))
    prune_old(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["1002"]
