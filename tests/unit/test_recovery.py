"""decide(): every class to the right action, retries bounded per stage, the same failure
twice a stop, remedies (memory up to the node's, nodes excluded) applied to the next chain."""

from __future__ import annotations

from typing import Any

import pytest

from hpcddf.engine.classify import failure_signature
from hpcddf.engine.plan import Resources, Stage
from hpcddf.engine.recovery import decide, guard_dependency, record, remedied
from hpcddf.engine.slurm_query import JobInfo

PLAN = {"stages": [{"name": "a", "resources": {"mem_gb": 8}}, {"name": "b", "resources": {"mem_gb": 8}}]}


def _job(state: str, exit_code: str = "0:0", nodes: str = "n01", reason: str = "None") -> JobInfo:
    run = JobInfo(job_id="1", state=state, node_list=nodes, reason=reason, exit_code=exit_code,
                  derived_exit_code="0:0")
    return JobInfo(job_id="1", state=state, node_list=nodes, reason=reason, exit_code=exit_code,
                   derived_exit_code="0:0", runs=(run,))


def _state(a: dict[str, Any], retries: int = 0) -> dict[str, Any]:
    return {"plan": PLAN, "stages": {
        "a": {"job_id": "1", "state": "running", "retries": retries, **a},
        "b": {"job_id": "2", "state": "cancelled", "note": "an earlier stage failed"}}}


def _dep_cancelled() -> JobInfo:
    return JobInfo(job_id="2", state="CANCELLED", node_list="None assigned", reason="Dependency",
                   exit_code="0:0", derived_exit_code="0:0")


@pytest.mark.parametrize("slurm_state, action, klass", [
    ("TIMEOUT", "resubmit", "timeout"), ("NODE_FAIL", "resubmit", "node_fail"),
    ("BOOT_FAIL", "resubmit", "boot_fail"), ("OUT_OF_MEMORY", "resubmit", "out_of_memory"),
    ("PREEMPTED", "resubmit", "preempted"), ("CANCELLED", "nothing", "cancelled"),
    ("FAILED", "stop", "permanent")])
def test_each_slurm_ending_gets_its_action(slurm_state, action, klass):
    d = decide(_state({}), {"1": _job(slurm_state, "1:0"), "2": _dep_cancelled()}, 2, 64)
    assert (d.action, d.stage, d.found.name) == (action, "a", klass)


def test_a_recorded_step_failure_with_an_exit_code_stops_with_reason_and_fix():
    err = {"message": "step x failed with exit code 1", "step": "x", "returncode": 1, "log": "/l"}
    state = _state({"state": "failed", "error": err})
    d = decide(state, {"1": _job("FAILED", "1:0")}, 2, 64)
    assert d.action == "stop" and "exit code 1" in d.note
    record(state, d)
    assert state["stages"]["a"]["state"] == "failed" and "/l" in state["stages"]["a"]["fix"]


def test_a_step_killed_by_sigkill_is_retried_with_more_memory_up_to_the_node():
    err = {"message": "step x failed", "step": "x", "returncode": -9, "argv": ["DDF.py"]}
    state = _state({"state": "failed", "error": err, "failures": [failure_signature(err)]})
    d = decide(state, {"1": _job("FAILED", "1:0")}, 2, 12)
    assert d.action == "resubmit" and d.found.name == "killed_by_signal" and d.retries == 1
    assert d.remedy["mem_gb"] == {"a": 12}  # 8 doubled, capped at the node's 12
    record(state, d)
    assert state["recovery"]["mem_gb"] == {"a": 12} and state["stages"]["a"]["retries"] == 1


def test_the_same_failure_twice_stops_the_field():
    err = {"message": "step x failed", "step": "x", "returncode": -9, "argv": ["DDF.py"]}
    state = _state({"state": "failed", "error": err, "failures": [failure_signature(err)] * 2}, retries=1)
    d = decide(state, {"1": _job("FAILED", "1:0")}, 2, 64)
    assert d.action == "stop" and d.found.name == "permanent" and "same failure" in d.found.reason


@pytest.mark.parametrize("max_retries, used, action", [(2, 0, "resubmit"), (2, 1, "resubmit"),
                                                       (2, 2, "stop"), (0, 0, "stop")])
def test_max_retries_is_honoured_per_stage(max_retries, used, action):
    d = decide(_state({}, retries=used), {"1": _job("TIMEOUT")}, max_retries, 64)
    assert d.action == action
    if action == "stop":
        assert "max_retries" in d.note


def test_a_node_fault_excludes_the_node_and_keeps_earlier_exclusions():
    state = _state({})
    state["recovery"] = {"exclude": ["n07"]}
    d = decide(state, {"1": _job("NODE_FAIL", nodes="n01")}, 2, 64)
    assert d.remedy["exclude"] == ["n07", "n01"]


def test_live_or_done_chains_need_nothing():
    assert decide(_state({}), {"1": _job("RUNNING")}, 2, 64).action == "nothing"
    assert decide(_state({"state": "done"}), {"1": _job("COMPLETED")}, 2, 64).action == "nothing"


def test_remedies_reach_the_next_submission():
    stage = Stage("a", ("x",), Resources(cpus=4, mem_gb=8, walltime_min=60, exclusive=False))
    out = remedied(stage, [{"mem_gb": {"a": 16}, "exclude": ["n02"]}, {"exclude": ["n01"]}], 12)
    assert out.resources.mem_gb == 12 and out.resources.extra == {"exclude": "n01,n02"}
    whole = Stage("a", ("x",), Resources(cpus=4, mem_gb=8, walltime_min=60, exclusive=True))
    assert remedied(whole, [{"mem_gb": {"a": 16}}], 12).resources.mem_gb == 8


def test_the_guard_wakes_on_any_stage_ending_not_ok():
    assert guard_dependency(["5", "6", "6"]) == "afternotok:5?afternotok:6"


def test_the_failed_stage_is_found_in_plan_order_past_the_stages_cancelled_after_it():
    """A local run records no Slurm jobs, and the state file keeps stages sorted by name: the
    stage that failed is found by the plan's order, not mistaken for a cancel by a person."""
    from hpcddf.engine.submission import AFTER_FAILURE_NOTE
    err = {"message": "step x failed with exit code 3", "step": "x", "returncode": 3, "log": "/l"}
    state = {"plan": {"stages": [{"name": "initial", "resources": {"mem_gb": 8}},
                                 {"name": "dirin", "resources": {"mem_gb": 8}}]},
             "stages": {"dirin": {"state": "cancelled", "note": AFTER_FAILURE_NOTE},
                        "initial": {"state": "failed", "error": err}}}
    d = decide(state, {}, 2, 64)
    assert (d.action, d.stage) == ("stop", "initial") and "exit code 3" in d.note


def test_a_memory_death_on_a_whole_node_halves_the_workers_instead():
    """No more memory to give a job that has the node: fewer parallel workers share it."""
    whole = {"stages": [{"name": "a", "resources": {"mem_gb": 64, "exclusive": True}}]}
    err = {"message": "step x failed", "step": "x", "returncode": -9, "argv": ["DDF.py"]}
    state = {"plan": whole, "stages": {"a": {"job_id": "1", "state": "failed", "error": err}}}
    d = decide(state, {"1": _job("FAILED", "1:0")}, 2, 64)
    assert d.action == "resubmit" and d.remedy["workers"] == {"a": 0.5} and d.remedy["mem_gb"] == {}
    record(state, d)
    state["stages"]["a"]["error"] = {**err, "returncode": -7}  # SIGBUS this time: not the same failure
    d2 = decide(state, {"1": _job("FAILED", "1:0")}, 2, 64)
    assert d2.remedy["workers"] == {"a": 0.25}
    stage = Stage("a", ("x",), Resources(cpus=32, mem_gb=64, walltime_min=60, exclusive=True))
    assert remedied(stage, [d2.remedy], 64).resources.workers_fraction == 0.25


def test_memory_is_doubled_first_then_workers_halved_once_the_node_is_full():
    plan = {"stages": [{"name": "a", "resources": {"mem_gb": 8, "exclusive": False}}]}
    err = {"message": "step x failed", "step": "x", "returncode": -9, "argv": ["DDF.py"]}
    state = {"plan": plan, "stages": {"a": {"job_id": "1", "state": "failed", "error": err}}}
    d = decide(state, {"1": _job("FAILED", "1:0")}, 3, 16)
    assert d.remedy["mem_gb"] == {"a": 16} and d.remedy["workers"] == {}
    record(state, d)
    state["stages"]["a"]["error"] = {**err, "returncode": -7}
    assert decide(state, {"1": _job("FAILED", "1:0")}, 3, 16).remedy["workers"] == {"a": 0.5}
