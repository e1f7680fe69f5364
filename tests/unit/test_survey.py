"""hpcddf survey: the database on both back ends (SQLite, and the local cluster's MariaDB in a
throwaway database), init, moves, status numbers, refusals, the sky plot; and the checks that
need no database (network file systems, URLs, the move rules)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests._require import need
from tests._survey import fields_by_id

need("sqlalchemy", "survey")
need("pymysql", "survey")
need("astropy", "survey")

from hpcddf.engine.sites import Site, load_site_file  # noqa: E402
from hpcddf.errors import SurveyError  # noqa: E402
from hpcddf.survey import db, storage  # noqa: E402
from hpcddf.survey.setup import init_survey  # noqa: E402
from hpcddf.survey.status import plot_sky, survey_status  # noqa: E402

S = db.FieldState

POINTINGS = "id,ra,dec\nL100001,180.0,50.0\nL100002,182.0,50.0\nL100003,181.0,51.5\nL100004,179.0,48.5\n"


# ------------------------------------------------------------------ the two back ends

@pytest.fixture(params=["sqlite", "mariadb"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The survey database of a test, on each back end."""
    if request.param == "sqlite":
        return str(tmp_path / "db" / "survey.sqlite")
    return str(request.getfixturevalue("mariadb_url"))


@pytest.fixture
def pointings(tmp_path: Path) -> Path:
    path = tmp_path / "lotss.csv"
    path.write_text(POINTINGS)
    return path


@pytest.fixture
def site(site_file: Path) -> Site:
    return load_site_file(site_file)


@pytest.fixture
def survey(site, pointings: Path, database: str, work_root: Path) -> str:  # noqa: ANN001
    """A survey of the four pointings; returns its database."""
    init_survey(site, pointings, [], work_root, database)
    return database


def _moves(database: str, *moves: tuple[list[str], db.FieldState, db.FieldState, str | None]) -> None:
    sdb = db.open_db(database)
    try:
        for ids, old, new, reason in moves:
            with sdb.begin() as conn:
                db.move_many(conn, ids, old, new, reason)
    finally:
        sdb.close()


def _sql(database: str, statement: str) -> None:
    sdb = db.open_db(database)
    try:
        with sdb.begin() as conn:
            conn.execute(db.sa.text(statement))
    finally:
        sdb.close()


# ------------------------------------------------------------------ init

def test_init_is_idempotent_and_adds_only_new_pointings(site, pointings: Path, survey: str,  # noqa: ANN001
                                                         work_root: Path) -> None:
    _moves(survey, (["L100001"], S.NEW, S.READY, None), (["L100001"], S.READY, S.REDUCING, None))
    again = init_survey(site, pointings, [], work_root, survey)
    assert again["added"] == [] and again["kept"] == 4 and again["fields"] == 4
    pointings.write_text(POINTINGS + "L100005,183.0,51.5\n")
    more = init_survey(site, pointings, [], work_root, survey)
    assert more["added"] == ["L100005"] and more["fields"] == 5
    rows = fields_by_id(survey)
    assert rows["L100001"].state is S.REDUCING and rows["L100001"].attempts == 1  # not reset
    assert rows["L100005"].state is S.NEW and (rows["L100005"].ra, rows["L100005"].dec) == (183.0, 51.5)
    assert more["survey"]["work_root"] == str(work_root) and more["survey"]["site"] == "testsite"


def test_init_refuses_another_work_root_and_a_moved_pointing(site, pointings: Path, survey: str,  # noqa: ANN001
                                                             tmp_path: Path, work_root: Path) -> None:
    with pytest.raises(SurveyError, match="was made with work_root"):
        init_survey(site, pointings, [], tmp_path / "elsewhere", survey)
    pointings.write_text(POINTINGS.replace("L100002,182.0", "L100002,182.5"))
    with pytest.raises(SurveyError, match="pointing L100002 is at 182.50000"):
        init_survey(site, pointings, [], work_root, survey)
    assert fields_by_id(survey)["L100002"].ra == 182.0


def test_init_refuses_ids_the_site_refuses_before_writing(site, tmp_path: Path, work_root: Path) -> None:  # noqa: ANN001
    table = tmp_path / "bad.csv"
    table.write_text("id,ra,dec\nP001,10,20\n")
    database = tmp_path / "db.sqlite"
    with pytest.raises(Exception, match="does not match this site's pattern"):
        init_survey(site, table, [], work_root, str(database))
    assert not database.exists()


# ------------------------------------------------------------------ moves

def test_moves_forward_back_with_a_reason_and_never_twice(survey: str) -> None:
    _moves(survey, (["L100001", "L100002"], S.NEW, S.FETCHING, None),
           (["L100001", "L100002"], S.FETCHING, S.READY, None),
           (["L100001"], S.READY, S.REDUCING, None))
    with pytest.raises(db.TransitionError, match="goes back and needs a reason"):
        _moves(survey, (["L100001"], S.REDUCING, S.READY, None))
    with pytest.raises(db.TransitionError, match="not a move a field can make"):
        _moves(survey, (["L100003"], S.NEW, S.DONE, None))
    with pytest.raises(db.TransitionError, match="needs the error"):
        _moves(survey, (["L100002"], S.READY, S.FAILED, None))
    _moves(survey, (["L100001"], S.REDUCING, S.READY, "node lost"), (["L100001"], S.READY, S.REDUCING, None))
    # L100002 is ready, not reducing: the whole move is refused and nothing moves
    with pytest.raises(db.TransitionError, match="1 of 2 field"):
        _moves(survey, (["L100001", "L100002"], S.REDUCING, S.DONE, None))
    rows = fields_by_id(survey)
    assert rows["L100001"].state is S.REDUCING and rows["L100001"].attempts == 2
    assert rows["L100001"].last_error == "node lost" and rows["L100002"].state is S.READY
    sdb = db.open_db(survey)
    with sdb.begin() as conn:
        moves = [(e["from_state"], e["to_state"]) for e in db.history(conn, "L100001")]
    sdb.close()
    assert moves == [(None, "new"), ("new", "fetching"), ("fetching", "ready"), ("ready", "reducing"),
                     ("reducing", "ready"), ("ready", "reducing")]


def test_every_state_has_its_rules_and_failed_needs_a_person() -> None:
    assert set(db.FORWARD) == set(S)
    for old, new in [(S.NEW, S.FETCHING), (S.REDUCING, S.DONE), (S.DONE, S.MOSAICKED)]:
        db.check_move("L1", old, new, None)
    for old, new in [(S.FAILED, S.READY), (S.MOSAICKED, S.DONE), (S.DONE, S.READY)]:
        with pytest.raises(db.TransitionError):
            db.check_move("L1", old, new, None)
        db.check_move("L1", old, new, "retry after fixing the data")
    with pytest.raises(db.TransitionError, match="from mosaicked a field moves to done"):
        db.check_move("L1", S.MOSAICKED, S.NEW, "why not")


# ------------------------------------------------------------------ status

def test_status_counts_rates_and_failures(survey: str) -> None:
    _moves(survey, (["L100001", "L100002", "L100003", "L100004"], S.NEW, S.READY, None),
           (["L100001", "L100002", "L100003", "L100004"], S.READY, S.REDUCING, None),
           (["L100001", "L100002"], S.REDUCING, S.DONE, None),
           (["L100003"], S.REDUCING, S.FAILED, "step ddf1 failed: DDF.py (exit code 1)"))
    sdb = db.open_db(survey)
    with sdb.begin() as conn:
        db.set_node_hours(conn, {"L100001": 30.0, "L100002": 12.5})
    sdb.close()
    # the survey is ten days old and L100001 was done three days ago, L100002 today
    _sql(survey, "UPDATE survey SET value = '\"2000-01-01T00:00:00\"' WHERE `key` = 'created_at'")
    now = db.utcnow()
    three_days_ago = (now - timedelta(days=3)).isoformat(sep=" ")
    _sql(survey, f"UPDATE events SET at = '{three_days_ago}' WHERE field_id = 'L100001' AND to_state = 'done'")
    doc = survey_status(survey, now=now + timedelta(seconds=1))
    assert doc["states"] == {"new": 0, "fetching": 0, "ready": 0, "reducing": 1, "done": 2, "failed": 1,
                             "mosaicked": 0}
    assert doc["node_hours"] == 42.5 and doc["fields"] == 4 and doc["remaining"] == 1
    per_day = doc["done_per_day"]
    assert len(per_day) == 7 and sum(per_day.values()) == 2
    assert per_day[now.date().isoformat()] == 1 and per_day[(now - timedelta(days=3)).date().isoformat()] == 1
    assert doc["rate_per_day"] == pytest.approx(2 / 7, abs=1e-3)
    assert doc["eta_days"] == pytest.approx(3.5, abs=0.02)
    assert doc["failed"] == [{"field": "L100003", "attempts": 1, "error": "step ddf1 failed: DDF.py (exit code 1)",
                              "since": doc["failed"][0]["since"]}]


def test_status_of_a_young_survey_uses_its_age_and_none_without_progress(survey: str) -> None:
    doc = survey_status(survey)
    assert doc["rate_per_day"] == 0 and doc["eta"] is None and doc["remaining"] == 4
    _moves(survey, (["L100001"], S.NEW, S.READY, None), (["L100001"], S.READY, S.REDUCING, None),
           (["L100001"], S.REDUCING, S.DONE, None))
    doc = survey_status(survey, now=db.utcnow() + timedelta(days=1))  # one day old, one field done
    assert doc["rate_per_day"] == pytest.approx(1.0, rel=0.01) and doc["eta_days"] == pytest.approx(3.0, rel=0.01)


def test_status_reads_while_a_tick_holds_its_write_transaction(survey: str) -> None:
    """A status during a tick neither waits for it nor sees its uncommitted moves."""
    sdb = db.open_db(survey)
    try:
        with sdb.begin() as conn:
            db.move_many(conn, ["L100001", "L100002"], S.NEW, S.READY)
            t0 = time.monotonic()
            doc = survey_status(survey)
            assert time.monotonic() - t0 < 5 and doc["states"]["new"] == 4
        assert survey_status(survey)["states"]["ready"] == 2
    finally:
        sdb.close()


def test_png_is_a_real_png_written_atomically(survey: str, tmp_path: Path) -> None:
    out = tmp_path / "sky.png"
    plot_sky(survey, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".sky.png")] == []


# ------------------------------------------------------------------ schema version and refusals

def test_a_schema_version_mismatch_is_refused(survey: str) -> None:
    _sql(survey, f"UPDATE schema_version SET version = {db.SCHEMA_VERSION + 1}")
    with pytest.raises(SurveyError, match=rf"schema version \[{db.SCHEMA_VERSION + 1}\]; this hpcddf reads "
                                          rf"version {db.SCHEMA_VERSION}"):
        db.open_db(survey)
    with pytest.raises(SurveyError, match="schema version"):
        db.open_db(survey, create=True)


def test_a_database_with_other_tables_or_no_survey_is_refused(database: str) -> None:
    if database.startswith("mysql"):
        with pytest.raises(SurveyError, match="no survey in the database"):
            db.open_db(database)
    else:
        with pytest.raises(SurveyError, match="no survey database at"):
            db.open_db(database)
    sa = db.sa
    url = storage.database_url(database)
    engine = storage.make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE slurm_things (x INTEGER)"))
    engine.dispose()
    with pytest.raises(SurveyError, match=r"holds other tables \(slurm_things\), not a survey"):
        db.open_db(database, create=True)


def test_a_wrong_password_is_one_line_without_the_password(mariadb_url: str) -> None:
    wrong = mariadb_url.replace("@127.0.0.1", "x@127.0.0.1")
    with pytest.raises(SurveyError) as exc:
        db.open_db(wrong, create=True)
    assert "cannot use the survey database" in str(exc.value) and "\n" not in str(exc.value)
    assert wrong.split(":")[2].split("@")[0] not in str(exc.value)


MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
nas:/export/home /home nfs4 rw,relatime,vers=4.2 0 0
10.0.0.1@o2ib:/scratch /project/lofar\\040data lustre rw,flock 0 0
/dev/nvme0n1 /home/local ext4 rw 0 0
"""


def test_network_file_systems_are_found_in_proc_mounts() -> None:
    assert storage.mount_type(Path("/home/alice/survey.sqlite"), MOUNTS) == "nfs4"
    assert storage.mount_type(Path("/home/local/survey.sqlite"), MOUNTS) == "ext4"  # the longest mount point
    assert storage.mount_type(Path("/homework/x"), MOUNTS) == "ext4"  # /home is no prefix of /homework
    assert storage.mount_type(Path("/project/lofar data/s.sqlite"), MOUNTS) == "lustre"
    assert storage.mount_type(Path("/tmp"), MOUNTS) == "tmpfs"


def test_sqlite_on_a_network_file_system_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SurveyError, match=r"on a nfs4 network file system.*mysql\+pymysql://"):
        storage.check_local_disk(Path("/home/alice/hpcddf/survey.sqlite"), MOUNTS)
    with pytest.raises(SurveyError, match="lustre"):
        storage.check_local_disk(Path("/project/lofar data/s.sqlite"), MOUNTS)
    storage.check_local_disk(Path("/home/local/s.sqlite"), MOUNTS)
    storage.check_local_disk(tmp_path / "s.sqlite")  # this machine's real /proc/mounts: a local disk


def test_database_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.describe(storage.database_url("/var/tmp/s.sqlite")) == "/var/tmp/s.sqlite"
    monkeypatch.setenv("HPCDDF_TEST_PW", "p@ss/w:rd")
    url = storage.database_url("mysql://lotss:${HPCDDF_TEST_PW}@db.example.org/lotss")
    assert url.drivername == "mysql+pymysql" and url.query["charset"] == "utf8mb4"
    assert (url.username, url.password, url.host, url.database) == ("lotss", "p@ss/w:rd", "db.example.org", "lotss")
    assert "***" in storage.describe(url)
    for bad, why in [("postgresql://a@b/c", "not supported"), ("mysql+mysqldb://a@b/c", "driver"),
                     ("mysql+pymysql://a@b", "names no database")]:
        with pytest.raises(SurveyError, match=why):
            storage.database_url(bad)


def test_a_missing_extra_is_one_line_naming_it() -> None:
    code = ("import sys; sys.modules['sqlalchemy'] = None\n"
            "try:\n    import hpcddf.survey.db\nexcept Exception as e:\n    print(type(e).__name__, e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == ("SurveyError the survey database needs SQLAlchemy, which is not installed "
                                   "(fix: pip install 'hpcddf[survey]')"), proc.stdout + proc.stderr


# ------------------------------------------------------------------ the command line

def test_cli_init_status_json_and_png(run_cli, write_site, pointings: Path, database: str,  # noqa: ANN001
                                      tmp_path: Path, cli_error) -> None:  # noqa: ANN001
    site = write_site("surveysite")
    with site.open("a") as fh:
        fh.write(f'\n[survey]\ndatabase = "{database}"\n')
    first = run_cli("survey", "init", "--pointings", pointings, "--site", "surveysite")
    assert first.returncode == 0, first.stderr
    assert "4 field(s) added, 0 already there, 4 in all" in first.stdout
    shown = run_cli("survey", "status", "--site", "surveysite")
    assert shown.returncode == 0, shown.stderr
    assert "fields per state" in shown.stdout and "ETA - (nothing done in the last week)" in shown.stdout
    png = tmp_path / "sky.png"
    as_json = run_cli("survey", "status", "--site", "surveysite", "--json", "--png", png)
    doc = json.loads(as_json.stdout)
    assert doc["states"]["new"] == 4 and doc["survey"]["name"] == "lotss" and doc["png"] == str(png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    if database.startswith("mysql"):
        assert database.split(":")[2].split("@")[0] not in as_json.stdout  # the password is never shown
    cli_error(run_cli("survey", "init", "--pointings", pointings, "--site", "surveysite", "--work-root", tmp_path),
              "was made with work_root")


def test_cli_status_without_a_survey(run_cli, tmp_path: Path, cli_error) -> None:  # noqa: ANN001
    cli_error(run_cli("survey", "status", "--db", tmp_path / "none.sqlite"), "no survey database at",
              "hpcddf survey init")


def test_the_site_survey_section_is_checked_like_every_other(write_site) -> None:  # noqa: ANN001
    site = write_site("typo")
    with site.open("a") as fh:
        fh.write('\n[survey]\ndatabse = "/var/tmp/s.sqlite"\n')
    with pytest.raises(Exception, match=r"unknown key 'databse'.*did you mean 'database'"):
        load_site_file(site)
    site.write_text(site.read_text().replace("databse", "database"))
    assert storage.default_database(load_site_file(site)) == "/var/tmp/s.sqlite"


@pytest.mark.parametrize("keys, needle", [
    ('fetch = ["rsync", "-a", "lta:/data/", "{dest}/"]', "does not name {field}"),
    ("tick_minutes = 0", "tick_minutes = 0.0 is impossible"),
    ("fetch_per_tick = 0", "fetch_per_tick = 0 is impossible"),
    ("fetch_retries = -1", "fetch_retries = -1 is impossible"),
    ("max_queued = 0", "max_queued = 0 is impossible")])
def test_impossible_tick_settings_are_refused_with_the_key(write_site, keys: str, needle: str) -> None:  # noqa: ANN001
    site = write_site("ticks")
    with site.open("a") as fh:
        fh.write(f"\n[survey]\n{keys}\n")
    with pytest.raises(Exception, match=re.escape(needle)):
        load_site_file(site)


def test_an_operational_setting_is_replaced_while_the_survey_settings_are_kept(survey: str) -> None:
    sdb = db.open_db(survey)
    try:
        for value in ("101", "102", None):
            with sdb.begin() as conn:
                db.set_setting(conn, "tick_job", value)
                db.write_settings(conn, {"site": "elsewhere"})  # init's settings never change
            with sdb.read() as conn:
                settings = db.read_settings(conn)
            assert settings["tick_job"] == value and settings["site"] == "testsite"
    finally:
        sdb.close()


def test_a_ready_field_whose_data_went_missing_is_fetched_again_not_submitted(site, survey: str) -> None:  # noqa: ANN001
    from hpcddf.survey.tick import TickReport, submit_ready
    _moves(survey, (["L100001"], S.NEW, S.READY, None))
    sdb = db.open_db(survey)
    try:
        with sdb.read() as conn:
            settings = db.read_settings(conn)
        report = TickReport()
        submit_ready(site, sdb, settings, report, lambda m: None)
    finally:
        sdb.close()
    assert report.moves == {"ready->new": ["L100001"]}
    row = fields_by_id(survey)["L100001"]
    assert row.state is S.NEW and "no longer in place" in row.last_error
