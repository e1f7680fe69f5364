"""The single-dish step before feathering (hpcddf.phangs.singledish), on a small simulated cube.

A 12 x 10 pixel TP cube of 160 channels of 1 km/s from 420 km/s (FREQ axis, decreasing with
velocity, as ALMA cubes come) holds a Gaussian line at 500 km/s (sigma 8 km/s) on a first-order
baseline that differs from pixel to pixel, plus a little noise. With bl_order 1 and a line
window of 459.5-540.5 km/s the baseline goes and the line's integrated flux stays; regridded to 2.5 km/s the
integrated flux and the line's velocity stay. Then the keys (singledish_config 'tp' only, with
valid values) and the plan and runner of a feather task (CASA replaced by a recorder: the
feather gets the processed cube). No CASA.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from hpcddf.errors import ConfigError
from hpcddf.phangs import plan as P
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.run import run_task
from hpcddf.phangs.run_common import PhangsRunError, RunContext
from hpcddf.phangs.singledish import (
    C_KMS,
    SingleDishError,
    SingleDishRecipe,
    process_singledish,
    regrid_channels,
    spectral_axis,
)
from tests.unit.test_phangs_plan import make_cleanmasks

REST_HZ = 230.538e9
NCHAN, NY, NX = 160, 10, 12
V0, DV = 420.0, 1.0  # first channel's velocity, channel width (km/s)
LINE_KMS, SIGMA_KMS, PEAK = 500.0, 8.0, 2.0
DATA = Path(__file__).resolve().parents[1] / "data" / "phangs_keys"


def _cube(path: Path, noise: float = 0.002) -> tuple[Path, np.ndarray]:
    """The simulated cube at ``path`` (Jy/beam) and its line alone [chan, y, x]."""
    v = V0 + DV * np.arange(NCHAN)
    yy, xx = np.mgrid[0:NY, 0:NX]
    amp = PEAK * np.exp(-((xx - 6) ** 2 + (yy - 5) ** 2) / 18.0)
    line = amp[None] * np.exp(-0.5 * ((v - LINE_KMS) / SIGMA_KMS) ** 2)[:, None, None]
    x = (v - v.mean()) / 80.0
    base = (0.3 + 0.01 * xx)[None] + (0.2 - 0.02 * yy)[None] * x[:, None, None]
    rng = np.random.default_rng(3)
    data = line + base + noise * rng.normal(size=line.shape)
    freq = REST_HZ * (1 - v / C_KMS)
    h = fits.Header()
    for i, (ctype, crval, cdelt, unit) in enumerate(
            (("RA---SIN", 170.0, -4.0 / 3600, "deg"), ("DEC--SIN", 13.0, 4.0 / 3600, "deg"),
             ("FREQ", freq[0], freq[1] - freq[0], "Hz")), start=1):
        h.update({f"CTYPE{i}": ctype, f"CRVAL{i}": crval, f"CDELT{i}": cdelt,
                  f"CRPIX{i}": 1.0, f"CUNIT{i}": unit})
    h.update({"BUNIT": "Jy/beam", "BMAJ": 28.6 / 3600, "BMIN": 28.6 / 3600, "BPA": 0.0,
              "RESTFRQ": REST_HZ})
    fits.PrimaryHDU(data.astype(np.float32), h).writeto(path)
    return path, line


def _recipe(**kw: Any) -> SingleDishRecipe:
    base = {"bl_order": 1, "chan_dv_kms": 0.0, "do_plots": False, "line_lo_kms": 459.5,
            "line_hi_kms": 540.5, "restfreq_hz": REST_HZ}
    return SingleDishRecipe(**{**base, **kw})


def test_the_baseline_goes_and_the_line_stays(tmp_path: Path) -> None:
    src, line = _cube(tmp_path / "tp.fits")
    out = tmp_path / "out" / "tp_processed.fits"
    summary = process_singledish(src, out, _recipe(do_plots=True), plot=tmp_path / "out" / "tp.png")
    got = fits.getdata(out).astype(float)
    assert got.shape == line.shape and summary["nchan_out"] == NCHAN
    assert summary["line_free_channels"] == 40 + 39  # 420-459 and 541-579 km/s
    # residual after subtraction is the noise (0.002) everywhere, the baseline (0.1-0.5) gone
    assert float(np.std(got - line)) < 0.004
    assert float(np.abs(np.mean(got - line, axis=0)).max()) < 0.003
    assert got.sum() == pytest.approx(line.sum(), rel=0.01)
    assert Path(summary["plot"]).stat().st_size > 1000
    assert "baseline order 1" in str(fits.getheader(out)["HISTORY"])


def test_regridding_keeps_the_flux_and_the_velocity(tmp_path: Path) -> None:
    src, line = _cube(tmp_path / "tp.fits", noise=0.0)
    out = tmp_path / "tp_2p5.fits"
    summary = process_singledish(src, out, _recipe(chan_dv_kms=2.5))
    got, h = fits.getdata(out).astype(float), fits.getheader(out)
    assert got.shape[0] == summary["nchan_out"] == NCHAN * 10 // 25  # 64 channels of 2.5
    axis = spectral_axis(h, REST_HZ, out)
    assert abs(axis.velocities_kms[1] - axis.velocities_kms[0]) == pytest.approx(2.5, rel=1e-6)
    # integrated flux (sum x channel width) and the flux-weighted velocity of the line
    assert got.sum() * 2.5 == pytest.approx(line.sum() * DV, rel=0.01)
    spec = got.sum(axis=(1, 2))
    assert float((spec * axis.velocities_kms).sum() / spec.sum()) == pytest.approx(LINE_KMS, abs=0.3)


def test_regrid_channels_is_an_overlap_weighted_mean() -> None:
    cube = np.arange(6, dtype=float).reshape(6, 1, 1)  # 0..5
    assert regrid_channels(cube, 2.0)[:, 0, 0].tolist() == [0.5, 2.5, 4.5]
    assert regrid_channels(cube, 1.5)[:, 0, 0] == pytest.approx([0.5 * (0 + 0.5 * 1) / 0.75,
                                                                 (0.5 * 1 + 2) / 1.5,
                                                                 (3 + 0.5 * 4) / 1.5,
                                                                 (0.5 * 4 + 5) / 1.5])
    cube[2] = np.nan  # a new channel touching a blank old one is blank
    assert np.isnan(regrid_channels(cube, 2.0)[1, 0, 0])


def test_too_few_line_free_channels_is_a_one_line_error(tmp_path: Path) -> None:
    src, _ = _cube(tmp_path / "tp.fits")
    with pytest.raises(SingleDishError, match="too few for a baseline of order 3") as exc:
        process_singledish(src, tmp_path / "o.fits", _recipe(bl_order=3, line_lo_kms=300.0,
                                                             line_hi_kms=576.5))
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------ keys, plan and runner


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    target = tmp_path / "keys"
    shutil.copytree(DATA, target)
    for line in (target / "ms_file_key.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            words = line.split()
            (tmp_path / f"ms_{words[3]}" / words[5]).mkdir(parents=True)
    (tmp_path / "singledish").mkdir()
    for line in (target / "singledish_key.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            _cube(tmp_path / "singledish" / line.split()[2])
    make_cleanmasks(target)
    return target


@pytest.mark.parametrize("line, match", [
    ("singledish_config  tp2  {'bl_order':1}", "tp2: only the one named 'tp' is used"),
    ("singledish_config  tp  {'bl_order':-1}", "bl_order -1 is negative"),
    ("singledish_config  tp  {'chan_dv_kms':-2.5}", "chan_dv_kms -2.5 is negative"),
])
def test_singledish_config_values_are_checked_with_their_line(keys: Path, line: str,
                                                              match: str) -> None:
    path = keys / "config_definitions.txt"
    path.write_text(path.read_text() + line + "\n")
    n = len(path.read_text().splitlines())
    with pytest.raises(ConfigError, match=match) as exc:
        load_project(keys / "master_key.txt")
    assert f"config_definitions.txt:{n}" in str(exc.value)


def test_feather_task_processes_the_single_dish_cube_before_feathering(
        keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """singledish_config tp (bl_order 1, chan_dv_kms 2.5) in the example keys: the feather
    units of ngc0628's co21 carry the step, the runner makes the processed cube once, and the
    feather stage gets it."""
    with open(keys / "singledish_key.txt", "a") as fh:
        fh.write("ngc0628  cont  ngc0628_tp_co21.fits\n")  # a continuum entry too
    project = load_project(keys / "master_key.txt")
    tasks = {t.id: t for t in P.plan_tasks(P.plan_project(project, targets=["ngc0628"]))}
    task = tasks["postprocess/ngc0628/co21/12m+7m+tp"]
    [unit] = task.params["units"]
    step = unit["singledish_step"]
    assert step["source"] == unit["singledish"]
    assert step["out"] == str(project.imaging_dir("ngc0628") / "ngc0628_co21_singledish.fits")
    assert step["recipe"]["bl_order"] == 1 and step["recipe"]["chan_dv_kms"] == 2.5
    # ngc0628's window: vsys 657 +- 120/2 km/s
    assert (step["recipe"]["line_lo_kms"], step["recipe"]["line_hi_kms"]) == (597.0, 717.0)
    # the continuum has no single-dish step (a baseline would remove the continuum)
    [cont_unit] = tasks["postprocess/ngc0628/cont/12m+7m+tp"].params["units"]
    assert cont_unit["singledish"] and "singledish_step" not in cont_unit
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_casa(self: RunContext, stage: str, **params: Any) -> dict[str, Any]:
        calls.append((stage, params))
        for out in task.outputs:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_bytes(b"")
        return {}

    monkeypatch.setattr(RunContext, "casa", fake_casa)
    # a line window covering the whole cube leaves no line-free channel: a one-line error
    # from the step, before any CASA call
    with pytest.raises(PhangsRunError, match="ngc0628_tp_co21.fits") as exc:
        bad = dict(task.params, units=[{**unit, "singledish_step": {
            **step, "recipe": {**step["recipe"], "line_lo_kms": 0.0, "line_hi_kms": 1e4}}}])
        run_task(P.Task(task.stage, task.key, task.depends, bad), tmp_path / "state-bad")
    assert calls == [] and "\n" not in str(exc.value)
    run_task(task, tmp_path / "state")
    [(stage, params)] = calls
    assert stage == "feather" and params["singledish"] == step["out"]
    assert fits.getheader(step["out"])["NAXIS3"] == 64  # 160 x 1 km/s -> 64 x 2.5 km/s
