"""Velocity-shuffled cubes (hpcddf.phangs.shuffle) and their place in the derived plan.

A Gaussian line injected at a known, spatially varying velocity field (fractional channels)
must land on the central channel of the shuffled axis with its shape intact; the shuffle_kw
keys are checked where the derived key is read; the derived plan holds the ``_shuffled`` cube
when shuffle_kw is set. numpy/FITS only, no CASA.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from hpcddf.errors import ConfigError
from hpcddf.phangs import plan as P
from hpcddf.phangs import plan_casa, plan_common
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.shuffle import shuffle_cube, shuffle_spectra

DATA = Path(__file__).resolve().parents[1] / "data" / "phangs_keys"
SIGMA_KMS = 6.0


def line_cube(vfield: np.ndarray, velocity: np.ndarray, noise: float = 0.0) -> np.ndarray:
    """A Gaussian line of peak 1 and sigma 6 km/s at vfield(y, x) in every spectrum."""
    cube = np.exp(-0.5 * ((velocity[:, None, None] - vfield[None]) / SIGMA_KMS) ** 2)
    if noise:
        cube += np.random.default_rng(3).normal(0.0, noise, cube.shape)
    return cube


def a_field(ny: int = 6, nx: int = 7) -> np.ndarray:
    """A rotation-like field with fractional-channel values between 430 and 570 km/s."""
    yy, xx = np.mgrid[:ny, :nx]
    return 500.0 + 11.3 * (xx - nx / 2) + 3.7 * (yy - ny / 2)


@pytest.mark.parametrize("method", ["fft", "linear"])
def test_an_injected_line_lands_on_the_central_channel(method: str) -> None:
    velocity = 650.0 - 5.0 * np.arange(61)  # 650 .. 350 km/s, decreasing as CASA cubes
    vfield = a_field()
    out, width, centre = shuffle_spectra(line_cube(vfield, velocity), velocity, vfield,
                                         method=method)
    assert out.shape == (61, 6, 7) and width == -5.0 and centre == 30
    assert (np.nanargmax(out, axis=0) == centre).all()
    offsets = (np.arange(61) - centre) * width
    expected = np.exp(-0.5 * (offsets / SIGMA_KMS) ** 2)
    core = np.abs(offsets) <= 30.0  # the line's +-5 sigma
    # linear interpolation between 5 km/s samples of a 6 km/s-sigma line flattens its peak by up
    # to 1 - exp(-0.5 (2.5/6)^2) = 8 %; the Fourier shift is exact for such a smooth line
    tol = 2e-3 if method == "fft" else 0.09
    assert np.allclose(out[core], expected[core, None, None], atol=tol)
    # the line flux (sum over channels) is kept
    assert np.allclose(np.nansum(out, axis=0), expected.sum(), rtol=1e-3)


def test_channels_from_outside_the_cube_are_blank_and_the_window_sets_the_axis() -> None:
    velocity = 400.0 + 5.0 * np.arange(41)  # 400 .. 600 km/s, increasing
    vfield = np.array([[420.0, 500.0, np.nan]])
    out, width, centre = shuffle_spectra(line_cube(np.nan_to_num(vfield, nan=500.0), velocity),
                                         velocity, vfield, method="fft")
    assert width == 5.0 and centre == 20
    # at 420 km/s the offsets below -20 km/s come from below the cube's 400 km/s: NaN
    assert np.isnan(out[:16, 0, 0]).all() and np.isfinite(out[16:, 0, 0]).all()
    assert np.isnan(out[:, 0, 2]).all()  # no velocity field there
    narrow, _, centre = shuffle_spectra(line_cube(vfield[:, :2], velocity), velocity,
                                        vfield[:, :2], window="30km/s")
    assert narrow.shape[0] == 7 and centre == 3  # -15 .. +15 km/s in 5 km/s channels
    assert (np.argmax(narrow, axis=0) == 3).all()
    fine, width, centre = shuffle_spectra(line_cube(vfield[:, :2], velocity), velocity,
                                          vfield[:, :2], channel_kms=2.5, nchan=25,
                                          method="linear")
    assert (width, centre, fine.shape[0]) == (2.5, 12, 25)
    with pytest.raises(ConfigError, match="fft method keeps"):
        shuffle_spectra(line_cube(vfield[:, :2], velocity), velocity, vfield[:, :2],
                        channel_kms=2.5)


def write_cube(path: Path, data: np.ndarray, velocity_kms: np.ndarray) -> Path:
    h = fits.Header()
    h.update({"CTYPE1": "RA---SIN", "CRVAL1": 150.0, "CDELT1": -1 / 3600, "CRPIX1": 4.0,
              "CUNIT1": "deg", "CTYPE2": "DEC--SIN", "CRVAL2": -30.0, "CDELT2": 1 / 3600,
              "CRPIX2": 3.5, "CUNIT2": "deg", "CTYPE3": "VRAD", "CUNIT3": "m/s",
              "CRVAL3": velocity_kms[0] * 1e3, "CDELT3": (velocity_kms[1] - velocity_kms[0]) * 1e3,
              "CRPIX3": 1.0, "SPECSYS": "LSRK", "RESTFRQ": 230.538e9, "BUNIT": "K",
              "BMAJ": 2 / 3600, "BMIN": 2 / 3600, "BPA": 0.0})
    fits.writeto(path, data.astype(np.float32), h)
    return path


def test_shuffle_cube_writes_a_velocity_offset_axis(tmp_path: Path) -> None:
    velocity = 650.0 - 5.0 * np.arange(61)
    vfield = a_field()
    cube = write_cube(tmp_path / "g_12m_co21.fits", line_cube(vfield, velocity, noise=0.01),
                      velocity)
    vh = fits.Header({"CTYPE1": "RA---SIN", "CRVAL1": 150.0, "CDELT1": -1 / 3600,
                      "CRPIX1": 4.0, "CTYPE2": "DEC--SIN", "CRVAL2": -30.0,
                      "CDELT2": 1 / 3600, "CRPIX2": 3.5, "BUNIT": "m/s"})
    fits.writeto(tmp_path / "vfield.fits", (vfield * 1e3).astype(np.float32), vh)
    out = shuffle_cube(cube, tmp_path / "vfield.fits", out_path=tmp_path / "g_shuffled.fits")
    data = fits.getdata(out)
    h = fits.getheader(out)
    assert (h["CTYPE3"], h["CRVAL3"], h["CRPIX3"], h["CDELT3"]) == ("VRAD", 0.0, 31.0, -5000.0)
    assert h["BUNIT"] == "K" and h["BMAJ"] == pytest.approx(2 / 3600)
    # the stacked spectrum peaks at v = 0 with the line's full height
    stacked = np.nanmean(data, axis=(1, 2))
    assert np.argmax(stacked) == 30 and stacked[30] == pytest.approx(1.0, abs=0.01)


# ---------------------------------------------------------------- keys and plan

@pytest.fixture
def keys(tmp_path: Path) -> Path:
    target = tmp_path / "keys"
    shutil.copytree(DATA, target)
    return target


def set_shuffle_kw(keys: Path, text: str, selector: str = "all  all_line") -> None:
    """Replace the example derived key's shuffle_kw line."""
    path = keys / "derived_key.txt"
    lines = [f"{selector}  shuffle_kw  {text}" if "shuffle_kw" in line else line
             for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("text, match", [
    ("{'windw': '30km/s'}", r"derived_key\.txt:\d+: shuffle_kw: unknown key 'windw'"),
    ("{'window': 'fast'}", r"derived_key\.txt:\d+: shuffle_kw window 'fast'"),
    ("{'nchan': 0}", r"derived_key\.txt:\d+: shuffle_kw 'nchan' is 0"),
    ("{'method': 'cubic'}", r"derived_key\.txt:\d+: shuffle_kw 'method'"),
    ("{'nchan': 9, 'window': 30}", r"derived_key\.txt:\d+: shuffle_kw gives both"),
])
def test_bad_shuffle_kw_is_an_error_naming_the_key_line(keys: Path, text: str, match: str
                                                        ) -> None:
    set_shuffle_kw(keys, text)
    with pytest.raises(ConfigError, match=match):
        load_project(keys / "master_key.txt")


def derived_tasks(keys: Path) -> dict[str, plan_common.Task]:
    project = load_project(keys / "master_key.txt")
    for t in project.whole_targets:
        for p in ("co21", "cont"):
            for c in plan_common.whole_target_configs(project, t, p):
                path = Path(plan_casa.postprocess_cube(project, t, p, c))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    return {t.id: t for arr in P.plan_project(project, stages=["derived"]) for t in arr.tasks}


def test_the_plan_holds_the_shuffled_cube_when_shuffle_kw_is_set(keys: Path) -> None:
    # the example's window key names a velocity field; give it the vfield_root it lacks
    master = keys / "master_key.txt"
    master.write_text(master.read_text() + "vfield_root  ../vfields/\n")
    window = load_project(master).window("ngc0628")
    assert window is not None and window.vfield_file
    (keys.parent / "vfields").mkdir()
    (keys.parent / "vfields" / window.vfield_file).touch()
    task = derived_tasks(keys)["derived/ngc0628/co21/12m+7m+tp"]
    shuffle = task.params["shuffle"]
    assert Path(shuffle["out"]).name == "ngc0628_12m+7m+tp_co21_shuffled.fits"
    assert shuffle["out"] in task.outputs and shuffle["kw"] == {"window": "30km/s"}
    assert shuffle["cube"] == task.params["chains"]["12m+7m+tp"]["levels"][0]["cube"]
    assert shuffle["vfield"] == task.params["vfield"]["out"]
    # without shuffle_kw there is none; a channel the fft shuffle cannot keep is refused
    set_shuffle_kw(keys, "{'nchan': 40}", selector="12m+7m+tp  co21")
    tasks = derived_tasks(keys)
    assert tasks["derived/ngc0628/co21/12m+7m"].params["shuffle"] is None
    assert tasks["derived/ngc0628/co21/12m+7m+tp"].params["shuffle"]["kw"] == {"nchan": 40}
    set_shuffle_kw(keys, "{'channel_kms': 5.0}")
    with pytest.raises(ConfigError, match=r"channel_kms 5 differs.*derived_key\.txt"):
        derived_tasks(keys)
