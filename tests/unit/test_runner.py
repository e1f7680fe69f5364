"""The step runner: markers written last and atomically, restart skips done steps, failures
leave the step not-done, and steps that would not fit in the walltime left are not started."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from hpcddf.engine import runner
from hpcddf.engine.runner import (
    Command,
    RunContext,
    Step,
    StopRequested,
    marker_path,
    read_marker,
    run_steps,
)
from hpcddf.errors import StepFailed


def py(code: str, log: str, timeout: float | None = 30) -> Command:
    return Command((sys.executable, "-c", code), log, timeout_s=timeout)


def ctx_for(tmp_path: Path, **kw) -> RunContext:
    return RunContext(workdir=tmp_path, log_dir=tmp_path / "logs", marker_dir=tmp_path / "done", **kw)


def write_step(name: str, out: str, extra: str = "") -> Step:
    code = "; ".join(c for c in ("import pathlib", extra, f"pathlib.Path({out!r}).write_text('x')") if c)
    return Step(name, "initial", (py(code, f"{name}.log"),), outputs=(out,))


def test_steps_run_in_order_and_markers_record_them(tmp_path):
    ctx = ctx_for(tmp_path)
    ran = run_steps(ctx, [write_step("a", "a.out"), write_step("b", "b.out")])
    assert ran == ["a", "b"]
    ma, mb = (json.loads(marker_path(ctx, n).read_text()) for n in "ab")
    assert ma["finished"] <= mb["started"]
    assert ma["outputs"] == ["a.out"] and ma["versions"]["hpcddf"]
    assert ma["commands"][0][0] == sys.executable


def test_restart_skips_done_steps_and_keeps_their_markers(tmp_path):
    ctx = ctx_for(tmp_path)
    steps = [write_step("a", "a.out"), write_step("b", "b.out")]
    run_steps(ctx, steps)
    before = marker_path(ctx, "a").stat().st_mtime_ns
    assert run_steps(ctx, steps) == []
    assert marker_path(ctx, "a").stat().st_mtime_ns == before


def test_a_done_step_whose_output_vanished_runs_again(tmp_path):
    ctx = ctx_for(tmp_path)
    steps = [write_step("a", "a.out")]
    run_steps(ctx, steps)
    (tmp_path / "a.out").unlink()
    assert read_marker(ctx, steps[0]) is None
    assert run_steps(ctx, steps) == ["a"]


def test_every_command_of_a_step_must_succeed_before_its_marker(tmp_path):
    # like kMS.py followed by ClipCal.py: a failure in the second command leaves the step not done
    ctx = ctx_for(tmp_path)
    step = Step("DIS0", "dirin_di", (py("open('sols.npz','w').write('s')", "DIS0-kms.log"),
                                     py("import sys; print('clipcal broke'); sys.exit(7)", "DIS0-clipcal.log")),
                outputs=("sols.npz",))
    with pytest.raises(StepFailed) as err:
        run_steps(ctx, [step])
    assert err.value.returncode == 7 and "clipcal broke" in err.value.log_tail
    assert not marker_path(ctx, "DIS0").exists()
    assert (tmp_path / "sols.npz").exists()  # the first command's output alone is not "done"


def test_missing_outputs_fail_the_step(tmp_path):
    ctx = ctx_for(tmp_path)
    with pytest.raises(StepFailed, match="outputs are missing: never.out"):
        run_steps(ctx, [Step("x", "initial", (py("pass", "x.log"),), outputs=("never.out",))])
    assert not marker_path(ctx, "x").exists()


def test_a_command_over_its_timeout_is_killed_and_fails(tmp_path):
    ctx = ctx_for(tmp_path)
    t0 = time.time()
    with pytest.raises(StepFailed, match="timed out"):
        run_steps(ctx, [Step("slow", "initial", (py("import time; time.sleep(60)", "slow.log", 1),))])
    assert time.time() - t0 < 30


@pytest.fixture
def quick_fresh(monkeypatch):
    """An attempt stops being fresh after 0.5 s of steps (not 5 s): the tests sleep 1 s."""
    monkeypatch.setattr(runner, "FRESH_TOLERANCE_S", 0.5)


def test_a_step_that_cannot_fit_requeues_before_starting(tmp_path, quick_fresh):
    ctx = ctx_for(tmp_path, deadline=time.time() + 20, safety_s=1)
    steps = [write_step("first", "first.out", "import time; time.sleep(1)"),
             Step("long", "initial", (py("open('l','w')", "long.log"),), estimate_s=100)]
    with pytest.raises(StopRequested, match="requeueing before starting"):
        run_steps(ctx, steps, walltime_s=3600)
    assert not (tmp_path / "logs" / "long.log").exists()


def test_measured_durations_beat_the_static_estimate(tmp_path):
    ctx = ctx_for(tmp_path, deadline=time.time() + 20, safety_s=1, estimates={"short": 2.0})
    steps = [Step("short", "initial", (py("pass", "short.log"),), estimate_s=100)]
    assert run_steps(ctx, steps, walltime_s=3600) == ["short"]


def test_a_step_longer_than_any_walltime_runs_first_thing_in_a_fresh_attempt(tmp_path):
    ctx = ctx_for(tmp_path, deadline=time.time() + 60, safety_s=1)
    steps = [Step("huge", "initial", (py("pass", "huge.log"),), estimate_s=10_000)]
    assert run_steps(ctx, steps, walltime_s=60) == ["huge"]


def test_a_long_step_is_never_started_late_even_if_no_walltime_would_hold_it(tmp_path, quick_fresh):
    # a step ran in this attempt: the long one waits for a fresh attempt, where it has the most
    # time, whether or not it fits a whole walltime (before: "longer than a walltime, run anyway")
    for estimate in (50, 10_000):
        ctx = ctx_for(tmp_path, deadline=time.time() + 60, safety_s=1)
        steps = [write_step(f"a{estimate}", f"a{estimate}.out", "import time; time.sleep(1)"),
                 Step(f"long{estimate}", "initial", (py("pass", f"long{estimate}.log"),), estimate_s=estimate)]
        with pytest.raises(StopRequested, match=f"step long{estimate} needs"):
            run_steps(ctx, steps, walltime_s=60)
        assert (tmp_path / f"a{estimate}.out").exists()
        assert not (tmp_path / "logs" / f"long{estimate}.log").exists()


def test_a_short_step_before_a_long_one_leaves_the_attempt_fresh(tmp_path):
    # a step that took under a few seconds does not make the long one wait for a new attempt
    ctx = ctx_for(tmp_path, deadline=time.time() + 60, safety_s=1)
    steps = [write_step("quick", "quick.out"),
             Step("huge", "initial", (py("pass", "huge.log"),), estimate_s=10_000)]
    assert run_steps(ctx, steps, walltime_s=60) == ["quick", "huge"]


def test_a_static_estimate_keeps_room_for_twice_its_time_a_measured_one_for_a_tenth_more(tmp_path, quick_fresh):
    # 15 s left after the first step: a static 10 s guess may really take 20 s, a measured
    # 10 s step will take about 11 s
    static = ctx_for(tmp_path, deadline=time.time() + 17, safety_s=1)
    first = write_step("a", "a.out", "import time; time.sleep(1)")
    second = Step("b", "initial", (py("open('b.out','w')", "b.log"),), outputs=("b.out",), estimate_s=10.0)
    with pytest.raises(StopRequested, match="needs ~20 s"):
        run_steps(static, [first, second], walltime_s=3600)
    (tmp_path / "done" / "a.done.json").unlink()
    measured = ctx_for(tmp_path, deadline=time.time() + 17, safety_s=1, estimates={"b": 10.0})
    assert run_steps(measured, [first, second], walltime_s=3600) == ["a", "b"]


def test_a_stop_request_stops_at_the_next_step_boundary(tmp_path):
    ctx = ctx_for(tmp_path)
    ctx.stop_event.set()
    with pytest.raises(StopRequested):
        run_steps(ctx, [write_step("a", "a.out")])
    assert not (tmp_path / "a.out").exists()


def _flaky(counter: Path, fail_times: int, message: str) -> str:
    """Code that fails (printing ``message``) the first ``fail_times`` runs, then succeeds."""
    return ("import pathlib, sys; c = pathlib.Path(%r); n = int(c.read_text()) if c.exists() else 0; "
            "c.write_text(str(n + 1)); n < %d and (print(%r), sys.exit(1)); "
            "pathlib.Path('ok.out').write_text('x')") % (str(counter), fail_times, message)


RACE = "in cleanupStaleShm\nFileNotFoundError: [Errno 2] No such file or directory: '/dev/shm/sem.x'"


def test_a_known_start_up_race_reruns_the_command(tmp_path):
    from hpcddf.lofar.ddfcommands import DDF_START_RACE
    cmd = Command((sys.executable, "-c", _flaky(tmp_path / "n", 2, RACE)), "race.log", 30,
                  retry_if=DDF_START_RACE)
    run_steps(ctx_for(tmp_path), [Step("s", "initial", (cmd,), outputs=("ok.out",))])
    assert (tmp_path / "n").read_text() == "3"  # failed twice, then ran to the end
    lines = (tmp_path / "logs" / "race.log").read_text().splitlines()
    assert lines.count("in cleanupStaleShm") == 2 and sum(x.startswith("# hpcddf ") for x in lines) == 3


def test_other_failures_and_endless_races_are_not_rerun_forever(tmp_path):
    from hpcddf.engine.runner import START_RETRIES
    from hpcddf.lofar.ddfcommands import DDF_START_RACE
    other = Command((sys.executable, "-c", _flaky(tmp_path / "a", 5, "MemoryError")), "a.log", 30,
                    retry_if=DDF_START_RACE)
    with pytest.raises(StepFailed):
        run_steps(ctx_for(tmp_path), [Step("a", "initial", (other,), outputs=("ok.out",))])
    assert (tmp_path / "a").read_text() == "1"
    endless = Command((sys.executable, "-c", _flaky(tmp_path / "b", 99, RACE)), "b.log", 30,
                      retry_if=DDF_START_RACE)
    with pytest.raises(StepFailed):
        run_steps(ctx_for(tmp_path), [Step("b", "initial", (endless,), outputs=("ok.out",))])
    assert (tmp_path / "b").read_text() == str(START_RETRIES + 1)
    assert not (tmp_path / "done" / "b.done.json").exists()


def test_a_first_field_learns_the_site_speed_from_its_own_steps(tmp_path, quick_fresh):
    # the first step was estimated at 10 s and took ~1 s: the next step's static 100 s
    # means ~10 s here, twice that fits the ~29 s left; without the lesson it would wait
    first = Step("a", "initial", (py("import time; time.sleep(1); open('a.out','w')", "a.log"),),
                 outputs=("a.out",), estimate_s=10.0)
    second = Step("b", "initial", (py("open('b.out','w')", "b.log"),), outputs=("b.out",), estimate_s=100.0)
    ctx = ctx_for(tmp_path, deadline=time.time() + 31, safety_s=1)
    assert run_steps(ctx, [first, second], walltime_s=3600) == ["a", "b"]
    assert 0.05 < ctx.speed[0] < 0.5
    assert json.loads(marker_path(ctx, "a").read_text())["estimate_s"] == 10.0


def test_measured_ratios_of_earlier_fields_scale_static_estimates(tmp_path):
    from hpcddf.engine.durations import load_estimates, load_speed, load_startup, record_duration, record_startup
    record_duration(tmp_path, "a", 30.0, estimate_s=60.0)
    record_duration(tmp_path, "b", 50.0)  # no static estimate: no ratio
    record_startup(tmp_path, 3.0)
    assert load_estimates(tmp_path) == {"a": 30.0, "b": 50.0} and load_speed(tmp_path) == [0.5]
    assert load_startup(tmp_path) == 3.0
    ctx = ctx_for(tmp_path, estimates=load_estimates(tmp_path), speed=load_speed(tmp_path))
    assert runner.expected_duration(ctx, Step("c", "initial", (), estimate_s=100.0)) == 50.0
    assert runner.expected_duration(ctx, Step("a", "initial", (), estimate_s=100.0)) == 30.0
