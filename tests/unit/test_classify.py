"""The class of every way a stage ends, from sacct rows plus the stage's record.

Rows marked CAPTURED are real output of ``slurm_query.sacct_argv`` (sacct -X -D -n -P, fields
JobID|State|ElapsedRaw|NNodes|NodeList|Reason|ExitCode|DerivedExitCode|Start) on the local
Slurm 22.05 (jobs made with sbatch --wrap: ``sleep 150`` under -t 1, ``exit 3``, ``scancel``,
``kill -9 $$``, ``srun`` of a python that SIGKILLs itself, ``scontrol requeue``, a dependency
on a failed job with --kill-on-invalid-dep, and 35607801: an hpcddf stage whose
scaled step exited 3). Rows marked WRITTEN are in the same format for
states this one-node cluster cannot produce: NODE_FAIL, BOOT_FAIL, PREEMPTED, and
OUT_OF_MEMORY (its TaskPlugin is task/none: no cgroup enforces --mem; a job using 300 MB
under --mem=50M completed). Their ExitCode is what Slurm commonly shows for them: 0:0 for
NODE_FAIL and BOOT_FAIL (the script never ended), 0:15 for PREEMPTED (SIGTERM), 0:125 for
OUT_OF_MEMORY.
"""

from __future__ import annotations

from hpcddf.engine.classify import (
    SAME_FAILURE_LIMIT,
    TRANSIENT,
    classify,
    ended_class,
    exit_pair,
    failure_signature,
    killed_by,
)
from hpcddf.engine.slurm_query import parse_jobs

CAPTURED = """35607640|TIMEOUT|60|1|vm|None|0:0|0:0|2026-12-06T06:52:40
35607641|FAILED|0|1|vm|None|3:0|0:0|2026-12-06T06:52:40
35607642|CANCELLED by 0|10|1|vm|None|0:0|0:0|2026-12-06T06:52:40
35607643|FAILED|0|1|vm|None|0:9|0:0|2026-12-06T06:52:40
35607645|COMPLETED|0|1|vm|None|0:0|0:0|2026-12-06T06:52:42
35607646|FAILED|0|1|vm|None|9:0|0:9|2026-12-06T06:52:43
35607648|REQUEUED|3|1|vm|None|0:0|0:0|2026-12-06T06:54:18
35607648|COMPLETED|8|1|vm|BeginTime|0:0|0:0|2026-12-06T06:54:32
35607650|CANCELLED|0|1|None assigned|Dependency|0:0|0:0|None
35607801|FAILED|1|1|vm|Dependency|1:0|1:0|2026-12-06T07:02:14
"""
WRITTEN = """41000001|NODE_FAIL|1200|1|node017|None|0:0|0:0|2026-12-05T23:10:00
41000002|BOOT_FAIL|0|1|node033|None|0:0|0:0|2026-12-05T23:10:05
41000003|PREEMPTED|300|1|node002|None|0:15|0:0|2026-12-05T23:11:00
41000004|OUT_OF_MEMORY|5400|1|node[040-041]|None|0:125|0:0|2026-12-05T23:12:00
41000005_3|REQUEUED|1800|1|node008|None|0:0|0:0|2026-12-05T22:00:00
41000005_3|NODE_FAIL|60|1|node009|None|0:0|0:0|2026-12-05T22:40:00
"""
JOBS = parse_jobs(CAPTURED + WRITTEN)


def runs(job_id: str):
    return JOBS[job_id].runs


def running(**extra) -> dict:
    """A record the node job left running: the job was killed before it could record more."""
    return {"state": "running", "job_id": "x", "node": "vm", "current_step": "image_dirin", **extra}


def step_failed(returncode: int | None, message: str, **extra) -> dict:
    """A record the node job wrote for a failed command (nodejob.StageJob.on_error)."""
    error = {"message": message, "step": "image_dirin", "argv": ["DDF.py", "x.parset"],
             "returncode": returncode, "log": "/w/logs/image_dirin.log",
             "log_tail": "...\nbus error\n"}
    return {"state": "failed", "job_id": "x", "node": "vm", "error": error, **extra}


def test_slurm_timeout_not_handled():
    c = classify(runs("35607640"), running())
    assert (c.name, c.transient, c.nodes) == ("timeout", True, ("vm",))
    assert "signal_delay_s" in c.fix


def test_node_fail_names_the_node_for_exclude():
    c = classify(runs("41000001"), running())
    assert (c.name, c.transient, c.nodes) == ("node_fail", True, ("node017",))
    assert "--exclude" in c.fix


def test_boot_fail():
    c = classify(runs("41000002"), {"state": "queued", "job_id": "x"})
    assert (c.name, c.transient, c.nodes) == ("boot_fail", True, ("node033",))


def test_preempted():
    c = classify(runs("41000003"), running())
    assert (c.name, c.transient) == ("preempted", True)


def test_slurm_out_of_memory_says_the_step_and_more_memory():
    c = classify(runs("41000004"), running())
    assert (c.name, c.transient, c.nodes) == ("out_of_memory", True, ("node[040-041]",))
    assert "image_dirin" in c.reason and "mem_gb" in c.fix


def test_slurm_oom_wins_over_the_nodes_killed_by_signal():
    """cgroup's OOM kill: the node saw its command die of SIGKILL, Slurm knows why."""
    c = classify(runs("41000004"), step_failed(-9, "step image_dirin failed: DDF.py (exit code -9)"))
    assert c.name == "out_of_memory"


def test_walltime_requeued_is_handled():
    c = classify(runs("35607648")[:1], {"state": "requeued", "job_id": "35607648", "node": "vm"})
    assert (c.name, c.transient) == ("walltime_requeued", True)
    assert "handled" in c.fix


def test_requeued_then_node_fail_classes_the_latest_run():
    assert JOBS["41000005_3"].state == "NODE_FAIL" and len(runs("41000005_3")) == 2
    assert classify(runs("41000005_3"), running()).nodes == ("node009",)


def test_command_killed_by_sigbus_is_likely_oom():
    rec = step_failed(-7, "step image_dirin failed: DDF.py (exit code -7)")
    c = classify(runs("35607641"), rec)
    assert (c.name, c.transient) == ("killed_by_signal", True)
    assert "SIGBUS" in c.reason and "out of memory" in c.reason


def test_shell_style_137_is_sigkill_but_plain_codes_are_not_signals():
    assert killed_by(-9).name == "SIGKILL" and killed_by(137).name == "SIGKILL"
    assert killed_by(3) is None and killed_by(130) is None and killed_by(None) is None


def test_batch_killed_by_sigkill_without_a_record():
    c = classify(runs("35607643"), running())
    assert (c.name, c.reason) == ("killed_by_signal", "the job was killed by SIGKILL before it could record why")


def test_step_killed_seen_in_derived_exit_code():
    assert classify(runs("35607646"), running()).name == "killed_by_signal"


def test_command_timeout():
    rec = step_failed(None, "step kms_dirin failed: kMS.py (timed out after 3600 s)")
    c = classify(runs("35607641"), rec)
    assert (c.name, c.transient) == ("command_timeout", True)


def test_step_cut_twice_is_too_long_and_permanent():
    rec = {"state": "failed", "job_id": "x", "node": "vm",
           "error": {"message": "step image_full was cut by the walltime 2 times", "step": "image_full",
                     "cut_after_s": [3500.0, 3480.0], "detail": "raise [slurm] max_walltime"}}
    c = classify(runs("35607641"), rec)
    assert (c.name, c.transient) == ("step_too_long", False)


def test_command_exit_code_is_permanent_with_the_step_and_log():
    """35607801: a real hpcddf stage whose scaled step ``cluster`` exited 3."""
    rec = step_failed(3, "step cluster failed: python (exit code 3) (fix: see the log /w/logs/cluster.log)")
    c = classify(runs("35607801"), rec)
    assert (c.name, c.transient) == ("permanent", False)
    assert c.reason == "step cluster failed: python (exit code 3)"
    assert "/w/logs/image_dirin.log" in c.fix


def test_preflight_error_is_permanent():
    rec = {"state": "failed", "job_id": "x", "error": {"message": "node vm failed preflight: shm",
                                                       "detail": "raise /dev/shm"}}
    c = classify(runs("35607641"), rec)
    assert (c.name, c.fix) == ("permanent", "raise /dev/shm")


def test_job_failed_before_recording():
    c = classify(runs("35607641"), running())
    assert (c.name, c.reason) == ("permanent", "the job exited 3 before recording an error")


def test_user_cancel_and_dependency_cancel_are_not_failures():
    assert classify(runs("35607642"), {"state": "cancelled", "job_id": "x"}).name == "cancelled"
    c = classify(runs("35607650"), {"state": "queued", "job_id": "x"})
    assert (c.name, c.transient, c.reason) == ("cancelled", False, "its dependency failed")
    assert c.nodes == ()  # "None assigned" is no node


def test_same_transient_failure_twice_is_permanent():
    rec = step_failed(-9, "step image_dirin failed: DDF.py (exit code -9)")
    once = dict(rec, failures=[failure_signature(rec["error"])])
    assert classify(runs("35607641"), once).name == "killed_by_signal"
    twice = dict(rec, failures=[failure_signature(rec["error"])] * SAME_FAILURE_LIMIT)
    c = classify(runs("35607641"), twice)
    assert (c.name, c.transient) == ("permanent", False) and "killed_by_signal" in c.reason


def test_signatures_ignore_numbers_in_the_last_log_line():
    """Two real SIGBUS deaths of the scaled step external_mask: their last lines differ only
    in the time stamp."""
    first = {"step": "external_mask", "returncode": -7, "log_tail": "tick 1796540600.20\n"}
    again = {"step": "external_mask", "returncode": -7, "log_tail": "tick 1796540913.71\n"}
    assert failure_signature(first) == failure_signature(again) == "external_mask|-7|tick #.#"
    assert failure_signature(first) != failure_signature({**again, "returncode": -9})


def test_different_failures_stay_transient():
    rec = step_failed(-9, "step image_dirin failed: DDF.py (exit code -9)")
    rec["failures"] = ["other_step|-9|x", failure_signature(rec["error"])]
    assert classify(runs("35607641"), rec).name == "killed_by_signal"


def test_live_and_done_have_no_class():
    assert classify(runs("35607645"), {"state": "done", "job_id": "x"}) is None
    live = parse_jobs("35607651|RUNNING|3|1|vm|None|0:0|0:0|2026-12-06T06:58:00\n")["35607651"]
    assert classify(live.runs, running()) is None


def test_no_sacct_answer_is_unknown_only_when_ended():
    assert classify((), running()) is None  # the scheduler not asked or not answering
    c = classify((), {"state": "failed", "job_id": "77"})
    assert (c.name, c.transient) == ("unknown", False) and "sacct -j 77" in c.fix


def test_unknown_when_slurm_and_record_disagree():
    assert classify(runs("35607645"), running()).name == "unknown"


def test_node_job_stores_the_class_of_what_it_records():
    rec = step_failed(None, "step kms failed: kMS.py (timed out after 60 s)")
    assert ended_class(rec)["name"] == "command_timeout"
    assert ended_class({"state": "done"}) is None


def test_every_class_has_a_transient_flag_and_exit_pairs_parse():
    assert set(TRANSIENT) >= {"walltime_requeued", "timeout", "node_fail", "preempted", "boot_fail",
                              "out_of_memory", "killed_by_signal", "command_timeout",
                              "step_too_long", "cancelled", "permanent", "unknown"}
    assert exit_pair("0:9") == (0, 9) and exit_pair("") == (0, 0) and exit_pair("3:0") == (3, 0)


def test_status_refresh_classes_every_ended_record_with_one_squeue_and_one_sacct(monkeypatch):
    """refresh_records on pasted Slurm answers (the commands cannot run in a unit test)."""
    from hpcddf.engine import slurm_query
    from hpcddf.engine.status import refresh_records
    calls: list[list[str]] = []

    def answer(argv, timeout=60):
        calls.append(argv)
        return "" if argv[0] == "squeue" else CAPTURED + WRITTEN
    monkeypatch.setattr(slurm_query, "_run", answer)
    killed = step_failed(-9, "step image_dirin failed: DDF.py (exit code -9)", job_id="41000004")
    killed["class"] = ended_class(killed)  # as the node job stores it: killed_by_signal
    failed = step_failed(3, "step cluster failed: python (exit code 3)", job_id="35607801")
    records = [running(job_id="35607640"), {"state": "queued", "job_id": "35607650"},
               killed, {"state": "running", "job_id": "999"}, {"state": "done", "job_id": "35607645"},
               {"state": "cancelled", "job_id": "35607642", "note": "cancelled by hpcddf cancel"}, failed]
    assert refresh_records(records) is None
    assert [c[0] for c in calls] == ["squeue", "sacct"]
    asked = calls[1][calls[1].index("-j") + 1].split(",")
    assert "41000004" in asked and not {"35607645", "35607642", "35607801"} & set(asked)  # final
    assert [r.get("class", {}).get("name") for r in records] == [
        "timeout", "cancelled", "out_of_memory", "unknown", None, "cancelled", "permanent"]
    assert records[0]["state"] == "failed" and records[1]["state"] == "cancelled"
    assert records[3]["state"] == "running"  # Slurm has no word of it: unknown, never failed


def test_a_stage_cancelled_after_a_failed_one_was_cancelled_for_its_dependency():
    from hpcddf.engine.status import _after_failure
    cancelled = {"name": "cancelled", "transient": False, "reason": "JobHeldUser", "fix": "-", "nodes": []}
    state = {"plan": {"stages": [{"name": "a"}, {"name": "b"}, {"name": "c"}]},
             "stages": {"a": {"state": "cancelled", "class": dict(cancelled)}, "b": {"state": "failed"},
                        "c": {"state": "cancelled", "class": dict(cancelled)}}}
    _after_failure(state)
    assert state["stages"]["c"]["class"]["reason"] == "its dependency failed"
    assert state["stages"]["a"]["class"]["reason"] == "JobHeldUser"  # before the failure: as recorded
