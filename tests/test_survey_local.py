"""`hpcddf survey tick` and `survey run` on the local site, through the real CLI: fields whose
data is in place, in archive tarballs, fetched by the site's command (once after a transient
failure), a broken archive, a field whose reduction fails; each ends where it should, with the
database, the field's state file and the history agreeing. The scaled pipeline stops after
dirin_di (a cfg file, as an operator would write it) so the whole survey takes seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests._require import need

need("sqlalchemy", "survey")
need("astropy", "survey")

from hpcddf.survey import db  # noqa: E402
from tests._survey import FETCH_SCRIPT, SHORT_CFG, fields_by_id, make_archive  # noqa: E402

S = db.FieldState
FIELDS = {  # id: how its data comes
    "L100001": "in place", "L100002": "tarball in place", "L100003": "fetched, reduction fails",
    "L100004": "fetch fails once", "L100005": "not a tarball", "L100006": "fetched"}


SITE = """\
scheduler = "local"
[node]
cpus = 2
mem_gb = 4
scratch_dir = "{root}/scratch"
[paths]
work_root = "{root}/work"
[fields]
pattern = "L[0-9]{{6}}"
[survey]
database = "{root}/db/survey.sqlite"
fetch = ["{python}", "{root}/fetch.py", "{{field}}", "{{dest}}"]
fetch_retries = 2
fetch_per_tick = 10
tick_minutes = 0.01
"""


@pytest.fixture
def survey_dir(tmp_path: Path, user_sites_dir: Path, observed) -> Path:  # noqa: ANN001
    """The site, the fetch script, the archive and the pointings of a six-field survey."""
    (user_sites_dir / "tiny.toml").write_text(SITE.format(root=tmp_path, python=sys.executable))
    (tmp_path / "fetch.py").write_text(FETCH_SCRIPT)
    archive = tmp_path / "archive"
    archive.mkdir()
    for fid in ("L100003", "L100004", "L100006"):
        make_archive(archive / f"{fid}.tar", f"{fid}_SB000_uv.MS")
    (archive / "L100004.flaky").touch()
    (archive / "L100005.tar").write_text("<html>not found</html>")
    work = tmp_path / "work"
    observed("L100001", root=work)
    (work / "L100002").mkdir()
    make_archive(work / "L100002" / "L100002_SB000.tar", "L100002_SB000_uv.MS")
    rows = [f"{fid},{150 + 0.5 * i},{50 + 0.3 * i}" for i, fid in enumerate(FIELDS)]
    (tmp_path / "pointings.csv").write_text("id,ra,dec\n" + "\n".join(rows) + "\n")
    (tmp_path / "short.cfg").write_text(SHORT_CFG)
    return tmp_path


def _history(database: Path, fid: str) -> list[tuple[str, str]]:
    sdb = db.open_db(str(database))
    try:
        with sdb.read() as conn:
            return [(str(e["from_state"]), str(e["to_state"])) for e in db.history(conn, fid)]
    finally:
        sdb.close()


def test_a_survey_on_the_local_site_settles_with_every_field_where_it_belongs(run_cli, survey_dir: Path) -> None:  # noqa: ANN001
    init = run_cli("survey", "init", "--site", "tiny", "--pointings", survey_dir / "pointings.csv",
                   "-c", survey_dir / "short.cfg", "--pipeline", "scaled", "--pipeline-opt", "seconds=0.05",
                   "--pipeline-opt", "fail=image_dirin_SSD", "--pipeline-opt", "fail_fields=L100003")
    assert init.returncode == 0, init.stderr
    one = run_cli("survey", "tick", "--site", "tiny", "--json", timeout=300)
    assert one.returncode == 0, one.stderr
    first = json.loads(one.stdout)
    assert sorted(first["moves"]["new->ready"]) == ["L100001"]  # data in place: no fetch
    assert "L100004" in first["moves"]["fetching->new"]  # retried next tick
    assert first["moves"]["fetching->failed"] == ["L100005"]

    run = run_cli("survey", "run", "--site", "tiny", timeout=600)
    assert run.returncode == 0, run.stderr
    assert "every field is done, mosaicked or failed" in run.stdout

    database = survey_dir / "db" / "survey.sqlite"
    rows = fields_by_id(database)
    assert {f: str(r.state) for f, r in rows.items()} == {
        "L100001": "done", "L100002": "done", "L100003": "failed", "L100004": "done",
        "L100005": "failed", "L100006": "done"}
    assert "image_dirin_SSD" in rows["L100003"].last_error
    assert "L100005.tar cannot be unpacked" in rows["L100005"].last_error
    assert ("fetching", "new") in _history(database, "L100004")
    # the local run stops at L100003's failure: L100006, after it, was not run and goes again
    assert ("reducing", "ready") in _history(database, "L100006")
    work = survey_dir / "work"
    for fid in ("L100002", "L100004", "L100006"):  # unpacked in place, tarball gone
        assert (work / fid / f"{fid}_SB000_uv.MS" / "table.dat").exists()
        assert not list((work / fid).glob("*.tar"))
    for fid, row in rows.items():
        if row.state is S.DONE:
            state = json.loads((work / fid / ".hpcddf" / "state.json").read_text())
            assert {s["state"] for s in state["stages"].values()} == {"done"}
            assert row.node_hours > 0

    again = run_cli("survey", "tick", "--site", "tiny", "--json", timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout)["moves"] == {}  # settled: nothing moves
    status = run_cli("survey", "status", "--site", "tiny", "--json")
    counts = json.loads(status.stdout)["states"]
    assert counts["done"] == 4 and counts["failed"] == 2


def test_a_failed_field_is_retried_by_a_person_and_refusals_are_one_line(run_cli, survey_dir: Path,  # noqa: ANN001
                                                                         cli_error) -> None:  # noqa: ANN001
    init = run_cli("survey", "init", "--site", "tiny", "--pointings", survey_dir / "pointings.csv",
                   "-c", survey_dir / "short.cfg", "--pipeline", "scaled", "--pipeline-opt", "seconds=0.05")
    assert init.returncode == 0, init.stderr
    database = survey_dir / "db" / "survey.sqlite"
    sdb = db.open_db(str(database))
    with sdb.begin() as conn:
        db.move_many(conn, ["L100001", "L100005"], S.NEW, S.FAILED, "bad archive")
    sdb.close()
    out = run_cli("survey", "retry", "L100001", "L100005", "--site", "tiny", "--reason", "archive fixed", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["moves"] == {"failed->ready": ["L100001"], "failed->new": ["L100005"]}
    assert fields_by_id(database)["L100001"].last_error == "retried: archive fixed"
    cli_error(run_cli("survey", "retry", "L100002", "--site", "tiny", "--reason", "x"), "is new, not failed")
    cli_error(run_cli("survey", "retry", "L999999", "--site", "tiny", "--reason", "x"), "not in the survey")
