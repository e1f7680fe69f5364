"""`hpcddf survey run` on the real local Slurm with the survey on its real MariaDB: the tick is
a Slurm job that fetches, unpacks and submits, queues the mosaics of complete neighbourhoods,
and queues its successor with --begin; nothing runs on the login node. Thirty fields of a
hexagonal tiling (one with its data in place, the rest fetched from a directory of archive
tarballs: a fetch that fails once, an archive that is not a tarball, a reduction killed by
SIGKILL once, one killed every time) settle by themselves: 28 fields reduced (scaled pipeline)
and mosaicked (real mosaics of the stand-in final images each field directory holds) as their
neighbourhoods complete, two failed with their reasons; the chain of tick jobs ends, and the
database agrees with Slurm and with every field's state file. A second `survey run` finds the
chain instead of starting another, and `--stop` cancels it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from tests._require import need
from tests.integration.conftest import hpcddf, sacct_settled, wait_for

need("sqlalchemy", "survey")
need("pymysql", "survey")
need("astropy", "survey")

from astropy.io import fits  # noqa: E402

from hpcddf.mosaic.combine import PRODUCTS  # noqa: E402
from hpcddf.mosaic.pointings import Pointing  # noqa: E402
from hpcddf.mosaic.survey_sim import FieldSpec, SkySource, hex_grid, write_field  # noqa: E402
from hpcddf.survey import db  # noqa: E402
from tests._survey import FETCH_SCRIPT, SHORT_CFG, fields_by_id, make_archive  # noqa: E402

ONE_STAGE_CFG = "[data]\nmslist = mslist.txt\n[control]\nexitafter = initial\n"  # a job per field

IMAGES = FieldSpec(cell_arcsec=6.0, resolution_arcsec=24.0, npix=128, pb_fwhm_deg=0.15, noise=1e-3)
FULL = PRODUCTS["full"]

SURVEY = """
[survey]
database = "{url}"
fetch = ["{python}", "{root}/fetch.py", "{{field}}", "{{dest}}"]
fetch_retries = 2
fetch_per_tick = 30
tick_minutes = {tick_minutes}
"""


def _site(slurm_site: Callable[..., Path], tmp_path: Path, url: str, tick_minutes: float) -> Path:
    path = slurm_site()
    path.write_text(path.read_text() + SURVEY.format(url=url, python=sys.executable, root=tmp_path,
                                                     tick_minutes=tick_minutes))
    return path


def _tick_job(url: str) -> str | None:
    sdb = db.open_db(url)
    try:
        with sdb.read() as conn:
            return db.read_settings(conn).get("tick_job")
    finally:
        sdb.close()


def _queued_ticks() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", "hpcddf-survey-tick", "-o", "%i %T"],
                         capture_output=True, text=True, timeout=30).stdout
    return out.split()[::2]


def _init(site: Path, tmp_path: Path, pts: list[Pointing], *opts: str, cfg: str = SHORT_CFG) -> None:
    rows = [f"{p.id},{p.ra!r},{p.dec!r}" for p in pts]
    (tmp_path / "pointings.csv").write_text("id,ra,dec\n" + "\n".join(rows) + "\n")
    (tmp_path / "short.cfg").write_text(cfg)
    (tmp_path / "fetch.py").write_text(FETCH_SCRIPT)
    hpcddf("survey", "init", "--site-file", str(site), "--pointings", str(tmp_path / "pointings.csv"),
           "-c", str(tmp_path / "short.cfg"), "--pipeline", "scaled", "--pipeline-opt", "seconds=0.05", *opts)


@pytest.fixture
def no_ticks_left() -> Any:
    yield
    left = _queued_ticks()
    if left:
        subprocess.run(["scancel", *left], check=False)


def test_a_survey_runs_itself_on_slurm_and_settles(slurm_site, mariadb_url: str, tmp_path: Path,  # noqa: ANN001
                                                   no_ticks_left: None) -> None:
    site = _site(slurm_site, tmp_path, mariadb_url, tick_minutes=0.1)
    pts = hex_grid(210.0, 54.0, 0.1, 3, prefix="F")[:30]  # F000 (the centre) .. F029
    ids = [p.id for p in pts]
    work = tmp_path / "work"
    sources = [SkySource(p.ra, p.dec, 0.5) for p in pts]
    for i, p in enumerate(pts):  # what the reduction leaves: the scaled pipeline makes no images
        write_field(work / p.id, p, IMAGES, sources, FULL.int_image, FULL.app_image, seed=i)
    archive = tmp_path / "archive"
    archive.mkdir()
    for fid in ids[1:]:
        make_archive(archive / f"{fid}.tar", f"{fid}_SB000_uv.MS")
    (archive / "F003.flaky").touch()
    (archive / "F004.tar").write_text("<html>not found</html>")
    ms = work / "F000" / "F000_SB000_uv.MS"
    ms.mkdir(parents=True)
    (ms / "table.dat").touch()
    _init(site, tmp_path, pts, "--pipeline-opt", "fail=image_dirin_SSD", "--pipeline-opt", "fail_fields=F005+F010",
          "--pipeline-opt", "fail_signal=KILL", "--pipeline-opt", "fail_times.F010=1", cfg=ONE_STAGE_CFG)

    first = json.loads(hpcddf("survey", "run", "--site-file", str(site), "--json").stdout)
    assert first["started"] and first["tick_job"]
    again = json.loads(hpcddf("survey", "run", "--site-file", str(site), "--json").stdout)
    assert not again["started"]  # the chain is found, not doubled

    settled = {"failed", "mosaicked"}
    wait_for(lambda: all(str(r.state) in settled for r in fields_by_id(mariadb_url).values()), 900,
             "every field to be mosaicked or failed")
    wait_for(lambda: not _queued_ticks() and _tick_job(mariadb_url) is None, 120,
             "the chain of tick jobs to end by itself")

    rows = fields_by_id(mariadb_url)
    failed = ("F004", "F005")
    assert {f: str(r.state) for f, r in rows.items()} == {**dict.fromkeys(ids, "mosaicked"), **dict.fromkeys(failed, "failed")}
    assert "F004.tar cannot be unpacked" in rows["F004"].last_error
    # killed twice the same way: retried once by the tick, then stopped with the reason
    assert "image_dirin_SSD" in rows["F005"].last_error and "SIGKILL" in rows["F005"].last_error
    assert rows["F005"].attempts == 2
    done = [f for f in ids if f not in failed]
    stage_jobs = {}
    for fid in done:
        state = json.loads((work / fid / ".hpcddf" / "state.json").read_text())
        assert {s["state"] for s in state["stages"].values()} == {"done"}, fid
        stage_jobs[fid] = [str(s["job_id"]) for s in state["stages"].values()]
        # submitted once, never twice; F010, killed once, was resubmitted once by the tick
        assert rows[fid].node_hours > 0 and rows[fid].attempts == (2 if fid == "F010" else 1), fid
    every_job = [j for jobs in stage_jobs.values() for j in jobs]
    assert set(sacct_settled(every_job).values()) == {"COMPLETED"}  # Slurm agrees
    for fid in done:
        mosaic = work / "mosaics" / fid / f"{fid}-full-mosaic.fits"
        with fits.open(mosaic) as h:
            assert h[0].header["OBJECT"] == f"{fid}-full" and h[0].data.size
        inputs = _inputs(work, fid)
        # made from the field and its done neighbours; the failed fields were left out, not waited for
        assert fid in inputs and set(inputs) <= set(done), (fid, inputs)
    assert len(list((work / ".survey-jobs").glob("*/*_result.pkl"))) >= 3


def _inputs(work: Path, centre: str) -> list[str]:
    """The fields the mosaic's done-marker says it was made from."""
    marker = next((work / "mosaics" / centre / ".hpcddf" / "done").glob("*.done.json"))
    return [str(i) for i in json.loads(marker.read_text())["inputs"]]


def test_a_second_run_finds_the_chain_and_stop_cancels_it(slurm_site, mariadb_url: str, tmp_path: Path,  # noqa: ANN001
                                                          no_ticks_left: None) -> None:
    site = _site(slurm_site, tmp_path, mariadb_url, tick_minutes=30)
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "F7.flaky").touch()  # its fetch fails: the survey cannot settle yet
    _init(site, tmp_path, [Pointing("F7", 210.0, 54.0)])
    first = json.loads(hpcddf("survey", "run", "--site-file", str(site), "--json").stdout)["tick_job"]
    successor = wait_for(lambda: (_tick_job(mariadb_url) or first) != first and _tick_job(mariadb_url), 120,
                         "the first tick to queue its successor")
    assert first not in _queued_ticks() and successor in _queued_ticks()  # waiting for its --begin
    again = json.loads(hpcddf("survey", "run", "--site-file", str(site), "--json").stdout)
    assert again == {"tick_job": successor, "started": False}
    assert str(fields_by_id(mariadb_url)["F7"].state) == "new"  # fetch failed once: tried again later
    stopped = json.loads(hpcddf("survey", "run", "--site-file", str(site), "--stop", "--json").stdout)
    assert stopped == {"cancelled": successor}
    wait_for(lambda: not _queued_ticks(), 60, "the cancelled tick to leave the queue")
    assert _tick_job(mariadb_url) is None
