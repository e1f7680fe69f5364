"""Stage requests sized from measured step durations: shorter walltimes once every step of a
stage is measured, splits at step boundaries when the steps would not fit one walltime, and
the plan unchanged while anything is unmeasured. On the local Slurm (the submitted --time read
back from scontrol) in tests/integration/test_walltime_rules.py."""

from __future__ import annotations

from dataclasses import replace

from hpcddf.engine.plan import Plan, Stage, fit_resources
from hpcddf.engine.sites import SlurmSection, load_site
from hpcddf.engine.sizing import needed_minutes, size_plan, usable_s


def _site(max_walltime: str = "1:00:00", light_cpus: int = 0):
    local = load_site("local", None)
    return replace(local, scheduler="slurm", node=replace(local.node, cpus=16, mem_gb=64),
                   slurm=SlurmSection(max_walltime=max_walltime, signal_delay_s=120, light_cpus=light_cpus))


def _plan(site, *stages: tuple[str, tuple[str, ...]]) -> Plan:
    res = fit_resources(site)
    out = []
    for name, steps in stages:
        out.append(Stage(name, steps, res, (out[-1].name,) if out else ()))
    return Plan("F1", site.name, tuple(out))


def test_measured_stages_ask_for_what_their_steps_need_plus_a_margin():
    site = _site()
    plan = size_plan(_plan(site, ("initial", ("a", "b")), ("dirin", ("c",))), site,
                     {"a": 300.0, "b": 600.0, "c": 60.0})
    # (900 s x 1.25 + 150 s signal lead + 60 s start-up) = 1335 s -> 23 min
    assert [(s.name, s.resources.walltime_min) for s in plan.stages] == [("initial", 23), ("dirin", 5)]
    assert plan.stages[1].depends_on == ("initial",)


def test_an_unmeasured_step_keeps_the_site_maximum():
    site = _site()
    plan = size_plan(_plan(site, ("initial", ("a", "b"))), site, {"a": 300.0})
    assert plan.stages[0].resources.walltime_min == 60


def test_a_stage_too_long_for_one_walltime_is_split_at_step_boundaries_and_rechained():
    site = _site()
    measured = {"a": 1200.0, "b": 1200.0, "c": 1200.0, "d": 100.0, "e": 30.0}
    plan = size_plan(_plan(site, ("initial", ("a", "b", "c", "d")), ("dirin", ("e",))), site, measured)
    names = [s.name for s in plan.stages]
    assert names == ["initial.1", "initial.2", "dirin"]
    assert [s.steps for s in plan.stages] == [("a", "b"), ("c", "d"), ("e",)]
    assert [s.depends_on for s in plan.stages] == [(), ("initial.1",), ("initial.2",)]
    for s in plan.stages:  # each part fits the site's walltime as the runner fits measured steps
        assert s.resources.walltime_min <= 60
        assert sum(measured[x] for x in s.steps) * 1.1 <= usable_s(site, 60)


def test_a_measured_start_up_replaces_the_assumed_minute():
    site = _site("0:05:00")  # 300 s - 150 s signal lead: room for steps depends on the start-up
    plan = _plan(site, ("initial", ("a", "b")))
    measured = {"a": 50.0, "b": 50.0}
    assert len(size_plan(plan, site, measured).stages) == 2  # (300-150-60)/1.1 = 82 s < 100 s
    assert len(size_plan(plan, site, measured, start_s=2.0).stages) == 1  # (300-150-2)/1.1 = 135 s


def test_a_step_longer_than_any_walltime_is_a_job_of_its_own_at_the_site_maximum():
    site = _site()
    plan = size_plan(_plan(site, ("initial", ("a", "huge", "b"))), site,
                     {"a": 60.0, "huge": 7200.0, "b": 60.0})
    assert [s.steps for s in plan.stages] == [("a",), ("huge",), ("b",)]
    assert [s.resources.walltime_min for s in plan.stages] == [5, 60, 5]


def test_needed_minutes_round_up_and_never_ask_for_nothing():
    site = _site()
    assert needed_minutes(site, []) == 4  # lead + start-up alone
    assert needed_minutes(site, [1.0]) == 4


def test_light_steps_ending_a_stage_run_on_a_few_cores_where_the_site_allows_it():
    light = frozenset({"mask", "report"})
    site = _site(light_cpus=2)
    plan = size_plan(_plan(site, ("initial", ("image", "mask", "report")), ("dirin", ("image2",))),
                     site, {}, light)
    assert [(s.name, s.steps, s.depends_on) for s in plan.stages] == [
        ("initial", ("image",), ()), ("initial.light", ("mask", "report"), ("initial",)),
        ("dirin", ("image2",), ("initial.light",))]
    small = plan.stages[1].resources
    assert (small.cpus, small.mem_gb, small.exclusive) == (2, 8, False)
    assert plan.stages[0].resources.cpus == 16
    # a site without light_cpus, or a stage of light steps only, stays whole
    assert len(size_plan(_plan(_site(), ("initial", ("image", "mask"))), _site(), {}, light).stages) == 1
    assert len(size_plan(_plan(site, ("initial", ("mask", "report"))), site, {}, light).stages) == 1
