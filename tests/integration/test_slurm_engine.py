"""The engine on the real local Slurm, with the scaled pipeline (same code path as the reduction)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import hpcddf, queue_empty_of, read_state, sacct_settled, wait_for

pytestmark = pytest.mark.slurm
SCALED = ["--pipeline", "scaled"]


def _job_ids(state: dict) -> list[str]:
    return [str(s["job_id"]) for s in state["stages"].values() if s.get("job_id")]


def _markers(work: Path, field: str) -> dict[str, dict]:
    return {p.name.split(".done.json")[0]: json.loads(p.read_text())
            for p in (work / field / ".hpcddf" / "done").glob("*.done.json")}


def sacct_runs(job: str) -> list[str]:
    """The state of each run of ``job`` in submission order: a requeued job keeps its id and
    sacct keeps a REQUEUED record of every earlier run (shown with --duplicates)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-D", "-j", job, "-o", "JobID,Submit,State"],
                         capture_output=True, text=True).stdout
    rows = [ln.split("|") for ln in out.splitlines() if ln.count("|") == 2]
    return [state.split()[0] for jid, _, state in sorted(rows, key=lambda r: r[1]) if jid == job]


def submitted_since(names: list[str], since: float) -> list[str]:
    """Job ids of every job named one of ``names`` that sacct has seen since ``since`` (epoch s;
    sacct -S reads local time), each once, requeues included."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since))
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", start, "--name", ",".join(names),
                          "-o", "JobID"], capture_output=True, text=True).stdout
    return sorted(set(out.split()))


def _all_done(work: Path, field: str):
    st = read_state(work, field)
    return st if all(s["state"] == "done" for s in st["stages"].values()) else None


def test_chain_runs_stages_in_order(slurm_site, tmp_path):
    site = slurm_site()
    work = tmp_path / "work"
    out = hpcddf("submit", "F1", "--site-file", str(site), *SCALED, "--pipeline-opt", "seconds=1",
                 "--control-exitafter=dirin_di", "--json")
    ids = json.loads(out.stdout)["fields"]["F1"]["jobs"]
    assert list(ids) == ["initial", "dirin", "dirin_di"]
    deps = subprocess.run(["squeue", "-h", "-j", ids["dirin"], "-o", "%E"], capture_output=True, text=True).stdout
    assert f"afterok:{ids['initial']}" in deps
    state = wait_for(lambda: _all_done(work, "F1"), 180, "the chain to finish")
    markers = _markers(work, "F1")
    order = [m for m in sorted(markers.values(), key=lambda m: m["started"])]
    stages_in_time_order = [m["stage"] for m in order]
    assert stages_in_time_order == sorted(stages_in_time_order, key=["initial", "dirin", "dirin_di"].index)
    assert len(markers) == 5 + 2 + 3
    assert all(s["attempts"] == 1 for s in state["stages"].values())
    assert set(sacct_settled(list(ids.values())).values()) == {"COMPLETED"}


def test_failing_stage_cancels_dependents_and_records_the_error(slurm_site, tmp_path):
    site = slurm_site()
    work = tmp_path / "work"
    out = hpcddf("submit", "F2", "--site-file", str(site), *SCALED, "--pipeline-opt", "seconds=0.5",
                 "--pipeline-opt", "fail=cluster", "--control-exitafter=dirin_di", "--json")
    ids = json.loads(out.stdout)["fields"]["F2"]["jobs"]
    wait_for(lambda: queue_empty_of(list(ids.values())), 180, "all jobs to leave the queue")
    state = read_state(work, "F2")
    dirin = state["stages"]["dirin"]
    assert dirin["state"] == "failed"
    assert dirin["error"]["step"] == "cluster"
    assert dirin["error"]["returncode"] == 3
    assert "failing on purpose" in dirin["error"]["log_tail"]
    assert "cluster" not in _markers(work, "F2")
    states = sacct_settled([ids["dirin"], ids["dirin_di"]])
    assert states[ids["dirin"]] == "FAILED"
    assert states[ids["dirin_di"]] == "CANCELLED"  # kill_on_invalid_dep, not pending forever
    status = hpcddf("status", "F2", "--site-file", str(site), "--json", "--efficiency")
    shown = json.loads(status.stdout)[0]["stages"]
    assert shown["dirin_di"]["state"] == "cancelled"
    # every ended stage classed: Slurm's word for the dependent, the node's for the command
    assert (shown["dirin_di"]["class"]["name"], shown["dirin_di"]["class"]["reason"]) == \
        ("cancelled", "its dependency failed")
    assert (shown["dirin"]["class"]["name"], shown["dirin"]["class"]["transient"]) == ("permanent", False)
    assert "step cluster failed" in shown["dirin"]["class"]["reason"]
    assert "class" not in shown["initial"]
    assert {"cpu_efficiency", "max_rss_bytes", "low_efficiency"} <= set(shown["initial"]["efficiency"])


def test_three_field_array_chain_with_aftercorr(slurm_site, tmp_path):
    site = slurm_site()
    work = tmp_path / "work"
    out = hpcddf("submit", "F10", "F11", "F12", "--site-file", str(site), *SCALED,
                 "--pipeline-opt", "seconds=0.5", "--pipeline-opt", "fail=cluster",
                 "--pipeline-opt", "fail_fields=F11", "--control-exitafter=dirin_di", "--json")
    doc = json.loads(out.stdout)["fields"]
    arrays = {stage: {doc[f]["jobs"][stage].split("_")[0] for f in doc} for stage in doc["F10"]["jobs"]}
    assert all(len(a) == 1 for a in arrays.values()), "each stage must be ONE array across the fields"
    assert [doc[f]["jobs"]["initial"].split("_")[1] for f in ("F10", "F11", "F12")] == ["0", "1", "2"]
    dep = subprocess.run(["squeue", "-h", "-j", next(iter(arrays["dirin"])), "-o", "%E"],
                         capture_output=True, text=True).stdout
    assert "aftercorr" in dep
    all_ids = [j for f in doc for j in doc[f]["jobs"].values()]
    wait_for(lambda: queue_empty_of(all_ids), 240, "the arrays to finish")
    assert _all_done(work, "F10") and _all_done(work, "F12")  # F11's failure did not stop them
    f11 = read_state(work, "F11")["stages"]
    assert f11["dirin"]["state"] == "failed"
    states = sacct_settled([doc["F11"]["jobs"]["dirin_di"]])
    assert states[doc["F11"]["jobs"]["dirin_di"]] == "CANCELLED"


def test_walltime_kill_requeues_and_resumes_without_redoing_steps(slurm_site, tmp_path):
    # 5 steps of 8 s; a 1-minute walltime with a 10 s signal lead leaves ~20 s per attempt
    site = slurm_site(walltime="1", requeues=6, signal_delay=10)
    work = tmp_path / "work"
    out = hpcddf("submit", "F3", "--site-file", str(site), *SCALED, "--pipeline-opt", "seconds=8",
                 "--control-exitafter=initial", "--json")
    job = json.loads(out.stdout)["fields"]["F3"]["jobs"]["initial"]
    state = wait_for(lambda: _all_done(work, "F3"), 420, "the requeued stage to finish", every=2)
    assert state["stages"]["initial"]["attempts"] >= 2
    logs = work / "F3" / "logs"
    runs = {p.stem: p.read_text().count("# hpcddf ") for p in logs.glob("*.log") if not p.stem.startswith("hpcddf-")}
    assert set(runs) == {"image_dirin_SSD_init", "external_mask", "image_dirin_SSD", "mask_diffuse", "image_dirin_SSD_m"}
    # at most the step the signal interrupted ran twice; finished steps were never redone
    assert sum(n - 1 for n in runs.values()) <= 1, runs
    markers = _markers(work, "F3")
    assert len(markers) == 5
    stage_log = (logs / "hpcddf-initial.log").read_text()
    assert "attempt 2" in stage_log
    # Slurm requeued the one job (not a resubmission): every attempt ran under the submitted
    # job id, sacct has one REQUEUED run per attempt but the last, and the last COMPLETED
    initial = state["stages"]["initial"]
    assert str(initial["job_id"]) == job, initial
    runs = wait_for(lambda: (r := sacct_runs(job)) and r[-1] == "COMPLETED" and r, 60,
                    "sacct to show the requeued job COMPLETED")
    assert runs == ["REQUEUED"] * (initial["attempts"] - 1) + ["COMPLETED"], (runs, initial)


def test_killed_job_is_resubmitted_and_resumes(slurm_site, tmp_path):
    site = slurm_site()
    work = tmp_path / "work"
    out = hpcddf("submit", "F4", "--site-file", str(site), *SCALED, "--pipeline-opt", "seconds=3",
                 "--control-exitafter=dirin", "--json")
    ids = json.loads(out.stdout)["fields"]["F4"]["jobs"]
    wait_for(lambda: len(_markers(work, "F4")) >= 2, 120, "two steps to finish")
    subprocess.run(["scancel", "--signal=KILL", "--full", ids["initial"]], check=True)
    wait_for(lambda: queue_empty_of(list(ids.values())), 120, "the killed chain to leave the queue")
    done_before = {k: v["finished"] for k, v in _markers(work, "F4").items()}
    assert len(done_before) < 7
    again = hpcddf("resubmit", "F4", "--site-file", str(site), "--json")
    new_ids = json.loads(again.stdout)["fields"]["F4"]["jobs"]
    assert new_ids["initial"] != ids["initial"]
    wait_for(lambda: _all_done(work, "F4"), 180, "the resubmitted chain to finish")
    after = _markers(work, "F4")
    assert len(after) == 7
    for step, finished in done_before.items():  # done steps were not redone
        assert after[step]["finished"] == finished


def test_preflight_failure_stops_the_job_before_any_step(slurm_site, tmp_path):
    site = slurm_site(max_map=10**12)
    work = tmp_path / "work"
    out = hpcddf("submit", "F5", "--site-file", str(site), *SCALED, "--control-exitafter=dirin", "--json")
    ids = json.loads(out.stdout)["fields"]["F5"]["jobs"]
    wait_for(lambda: queue_empty_of(list(ids.values())), 120, "the jobs to leave the queue")
    state = read_state(work, "F5")
    err = state["stages"]["initial"]["error"]
    assert state["stages"]["initial"]["state"] == "failed"
    assert "max_map_count" in err["message"] and "fix" in (err.get("detail") or "").lower() + err["message"].lower()
    assert not _markers(work, "F5")
    assert not (work / "F5" / "logs" / "image_dirin_SSD_init.log").exists()


def test_two_concurrent_submits_give_one_chain(slurm_site, tmp_path):
    site = slurm_site()
    results = []

    def go():
        results.append(hpcddf("submit", "F6", "--site-file", str(site), *SCALED, "--pipeline-opt",
                              "seconds=1", "--control-exitafter=dirin", "--json"))
    threads = [threading.Thread(target=go) for _ in range(2)]
    t0 = int(time.time()) - 1  # sacct -S has whole seconds
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    docs = {d["status"]: d for d in (json.loads(r.stdout)["fields"]["F6"] for r in results)}
    assert sorted(docs) == ["already queued", "submitted"]
    chain = docs["submitted"]["jobs"]
    assert list(chain) == ["initial", "dirin"]
    # the second submit found the first one's jobs live and queued nothing itself
    live = docs["already queued"]["jobs"]["live"].split(",")
    assert live and set(live) <= set(chain.values()), (live, chain)
    state = read_state(tmp_path / "work", "F6")
    assert len(state["submissions"]) == 1
    assert {s: str(state["stages"][s]["job_id"]) for s in chain} == chain
    # and Slurm was given that one chain: one job named hpcddf-F6-initial since the submits
    # began, whether it still waits, runs or has ended (a second chain would start with its own;
    # its later stages wait on a dependency, which sacct -S does not list as eligible yet)
    first = wait_for(lambda: (ids := submitted_since(["hpcddf-F6-initial"], t0)) and chain["initial"] in ids
                     and ids, 60, "sacct to record the chain's first job")
    assert first == [chain["initial"]], (first, chain)


def test_cancel_stops_the_chain_and_records_it(slurm_site, tmp_path):
    site = slurm_site()
    work = tmp_path / "work"
    out = hpcddf("submit", "F7", "F8", "--site-file", str(site), *SCALED, "--pipeline-opt", "seconds=5",
                 "--control-exitafter=dirin", "--json")
    doc = json.loads(out.stdout)["fields"]
    ids = [j for f in doc.values() for j in f["jobs"].values()]
    # array task logs are reachable from each field's own directory
    assert (work / "F8" / ".hpcddf" / "jobs" / doc["F8"]["jobs"]["initial"]).is_symlink()
    wait_for(lambda: read_state(work, "F7")["stages"]["initial"]["state"] == "running", 120, "F7 to start")
    res = hpcddf("cancel", "F7", "--site-file", str(site))
    assert "cancelled" in res.stdout and doc["F7"]["jobs"]["initial"] in res.stdout
    wait_for(lambda: queue_empty_of([doc["F7"]["jobs"]["initial"], doc["F7"]["jobs"]["dirin"]]), 60,
             "F7's jobs to leave the queue")
    st = read_state(work, "F7")["stages"]
    assert st["initial"]["state"] == "cancelled" and st["dirin"]["state"] == "cancelled"
    wait_for(lambda: _all_done(work, "F8"), 180, "F8, not cancelled, to finish")
    assert queue_empty_of(ids)
