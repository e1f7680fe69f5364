"""A node that failed under one field's job is avoided by every job of the site for a while:
remembered when recovery classifies the fault, put in each submission's --exclude (beside the
stage's own), forgotten when its time is up."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from hpcddf.engine.backend import slurm_parameters
from hpcddf.engine.exclusions import excluded, exclusions_file, remember
from hpcddf.engine.plan import Resources
from hpcddf.engine.recovery import decide_and_record
from hpcddf.engine.sites import Site, load_site_file
from hpcddf.engine.slurm_query import JobInfo
from hpcddf.engine.state import update_state

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)


def _site(write_site, tmp_path: Path, hours: float = 24.0, name: str = "c1") -> Site:  # noqa: ANN001
    path = write_site(name, scheduler="slurm", root=tmp_path / name)
    path.write_text(path.read_text().replace("[slurm]\n", f"[slurm]\nexclude_node_hours = {hours}\n"))
    return load_site_file(path)


def test_a_remembered_node_is_excluded_until_its_time_is_up(write_site, tmp_path: Path) -> None:  # noqa: ANN001
    site = _site(write_site, tmp_path)
    assert excluded(site) == []
    remember(site, ["n07"], now=T0)
    remember(site, ["n03", "None assigned", ""], now=T0 + timedelta(hours=20))
    assert excluded(site, now=T0 + timedelta(hours=23)) == ["n03", "n07"]
    assert excluded(site, now=T0 + timedelta(hours=25)) == ["n03"]  # n07 is back by itself
    other = _site(write_site, tmp_path, name="c2")
    assert excluded(other, now=T0) == []  # another site's nodes are its own
    assert set(json.loads(exclusions_file(site).read_text())) == {"n03", "n07"}


def test_zero_hours_never_excludes(write_site, tmp_path: Path) -> None:  # noqa: ANN001
    site = _site(write_site, tmp_path, hours=0)
    assert remember(site, ["n07"]) == [] and excluded(site) == []
    assert not exclusions_file(site).exists()


def test_an_unreadable_memory_excludes_nothing(write_site, tmp_path: Path) -> None:  # noqa: ANN001
    site = _site(write_site, tmp_path)
    exclusions_file(site).parent.mkdir(parents=True)
    exclusions_file(site).write_text("{not json")
    assert excluded(site) == []
    assert remember(site, ["n01"]) == ["n01"]  # and it is rewritten whole


def test_every_submission_excludes_the_remembered_nodes_beside_its_own(write_site, tmp_path: Path) -> None:  # noqa: ANN001
    site = _site(write_site, tmp_path)
    res = Resources(cpus=4, mem_gb=8, walltime_min=60, exclusive=False, extra={"exclude": "n02"})
    assert slurm_parameters(site, res, "x", None, False, 1)["additional_parameters"]["exclude"] == "n02"
    remember(site, ["n07", "n02"])
    params = slurm_parameters(site, res, "x", None, False, 1)
    assert params["additional_parameters"]["exclude"] == "n02,n07"
    bare = Resources(cpus=4, mem_gb=8, walltime_min=60, exclusive=False)
    assert slurm_parameters(site, bare, "x", None, False, 1)["additional_parameters"]["exclude"] == "n02,n07"


def test_a_node_fault_decided_for_one_field_is_remembered_for_the_site(write_site, tmp_path: Path) -> None:  # noqa: ANN001
    site = _site(write_site, tmp_path)
    workdir = site.work_root / "L100001"

    def change(st: dict) -> None:
        st["plan"] = {"stages": [{"name": "a", "resources": {"mem_gb": 8}}]}
        st["stages"]["a"] = {"job_id": "11", "state": "running"}
    update_state(workdir, "L100001", change)
    run = JobInfo(job_id="11", state="NODE_FAIL", node_list="n09", reason="None", exit_code="0:0",
                  derived_exit_code="0:0")
    d = decide_and_record(site, workdir, "L100001", {"11": JobInfo(**{**run.__dict__, "runs": (run,)})})
    assert d.action == "resubmit" and d.found.name == "node_fail"
    assert excluded(site) == ["n09"]
