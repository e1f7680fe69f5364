"""Automatic DI solution intervals (ddf-pipeline's give_dt_dnu): the arithmetic, the scatter
measured on a simulated MS against the noise it was made with, and the wrapper that hands kMS
the intervals (exec, so the runner's timeout and log hold for kMS itself)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from hpcddf.lofar.solint import intervals, measure, nearest_divisor


def test_cells_hold_enough_samples_for_an_snr_of_ten():
    # S/M = 0.4: nb = (10 x 0.4)^2 = 16 samples: 4 channels x 4 integrations
    dt, nsols = intervals(0.4, 1.0, nchan=8, interval_s=8.0)
    assert (dt, nsols) == (4 * 8.0 / 60.0, 2)
    # bright data: one sample is enough, a solution per channel and integration
    assert intervals(0.01, 1.0, nchan=4, interval_s=8.0) == (8.0 / 60.0, 4)
    # faint data: all channels in one cell, the rest in time
    dt, nsols = intervals(3.0, 1.0, nchan=4, interval_s=8.0)
    assert nsols == 1 and dt == round(900 / 4) * 8.0 / 60.0


def test_the_channel_step_snaps_to_a_divisor_of_the_channel_count():
    assert nearest_divisor(12, 5) == 4 and nearest_divisor(12, 5.5) == 6 and nearest_divisor(7, 3) == 1
    assert nearest_divisor(10, 3) == 2  # 2 is one away, 5 two


@pytest.fixture(scope="module")
def sim_ms(tmp_path_factory):
    pytest.importorskip("casacore.tables")
    from hpcddf.lofar.simulate import SimSpec, simulate_field
    out = tmp_path_factory.mktemp("solint")
    res = simulate_field(out, SimSpec(n_ms=1, nant=8, ntime=20))
    return str(res.ms[0])


def test_the_scatter_is_the_simulated_noise(sim_ms):
    s, m, nchan, interval = measure(sim_ms, "DATA")
    # cross-hands hold noise only: 0.05 Jy per real and imaginary part -> std 0.05 x sqrt(2)
    assert s == pytest.approx(0.05 * math.sqrt(2), rel=0.05)
    assert m > 10 * s and nchan == 4 and interval == 8.0


def test_the_wrapper_appends_the_intervals_and_execs_the_solver(sim_ms, tmp_path):
    echo = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]
    run = subprocess.run([sys.executable, "-m", "hpcddf.lofar.solint", "--ms", sim_ms, "--col", "DATA",
                          "--nchan", "2", "--", *echo, "--MSName", sim_ms],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert "NChanSols=2 (given)" in lines[0] and "dt=" in lines[0]
    args = json.loads(lines[-1])
    assert args[:2] == ["--MSName", sim_ms] and args[2] == "--dt" and args[4:] == ["--NChanSols", "2"]
    s, m, nchan, interval = measure(sim_ms, "DATA")
    assert float(args[3]) == pytest.approx(intervals(s, m, nchan, interval)[0] + 1e-4, rel=1e-4)
