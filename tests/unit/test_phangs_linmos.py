"""The linear mosaic of PHANGS mosaic parts (hpcddf.phangs.linmos.linear_mosaic) on synthetic parts
with a known sky, and how the plan hands parts and single-dish cubes to the postprocess task.

Each synthetic part is what the CASA postprocess writes for one pointing: a pb-corrected cube in
K at a round beam (sky + noise/pb, blank where pb < 0.2), the flat cube (pbcorr x pb: noise of
uniform sigma) and the primary beam, trimmed to a box around the pointing on one common
projection. No CASA.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from hpcddf.errors import ConfigError
from hpcddf.phangs import plan as P
from hpcddf.phangs import plan_casa
from hpcddf.phangs.galaxy import GalaxySpec, mosaic_parts_of, write_keys
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.linmos import (
    MOSAIC_PRODUCTS,
    common_grid,
    cube_noise,
    linear_mosaic,
    mosaic_weights,
    on_channels,
)
from hpcddf.phangs.plan_common import Task
from hpcddf.phangs.run import run_task
from hpcddf.phangs.run_common import PhangsRunError, RunContext, read_task_state

CELL = 0.5          # arcsec
PB_FWHM = 20.0      # arcsec
CUTOFF = 0.2
NCHAN = 5
SPACING = 12.0      # arcsec between the two pointings, along x
SKY_SIGMA = 2.0     # arcsec: the Gaussian blob on the sky (intrinsic)
FWHM = math.sqrt(8 * math.log(2))


def pixel_offsets(x0: int, y0: int, nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (arcsec) from the tangent point of pixels x0.., y0.. of the global grid."""
    x = (np.arange(nx) + x0) * CELL
    y = (np.arange(ny) + y0) * CELL
    return np.meshgrid(x, y)


def sky_at_beam(x: np.ndarray, y: np.ndarray, beam: float) -> np.ndarray:
    """The blob seen at a round beam of FWHM ``beam`` (K: peak scales, integral kept), one
    amplitude per channel: a line in the middle channels, line-free channels around it."""
    s2 = SKY_SIGMA ** 2 + (beam / FWHM) ** 2
    plane = 10.0 * SKY_SIGMA ** 2 / s2 * np.exp(-(x ** 2 + y ** 2) / (2 * s2))
    return np.stack([plane * a for a in (0.0, 0.6, 1.0, 0.0, 0.0)])


def pb_at(x: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    return np.exp(-4 * math.log(2) * ((x - px) ** 2 + y ** 2) / PB_FWHM ** 2)


def header(x0: int, y0: int, nx: int, ny: int, beam: float, v0: float = 450e3,
           dv: float = 10e3) -> fits.Header:
    """SIN projection at 150, -30; global pixel (x, y) is offset (x, y)*CELL (x to the west,
    as CDELT1 < 0); pixel 0 of this part is global pixel (x0, y0)."""
    h = fits.Header()
    h.update({"NAXIS": 3, "NAXIS1": nx, "NAXIS2": ny, "NAXIS3": NCHAN,
              "CTYPE1": "RA---SIN", "CRVAL1": 150.0, "CDELT1": -CELL / 3600, "CRPIX1": 1.0 - x0,
              "CUNIT1": "deg", "CTYPE2": "DEC--SIN", "CRVAL2": -30.0, "CDELT2": CELL / 3600,
              "CRPIX2": 1.0 - y0, "CUNIT2": "deg", "CTYPE3": "VRAD", "CRVAL3": v0, "CDELT3": dv,
              "CRPIX3": 1.0, "CUNIT3": "m/s", "SPECSYS": "LSRK", "RESTFRQ": 230.538e9,
              "BUNIT": "K", "BMAJ": beam / 3600, "BMIN": beam / 3600, "BPA": 0.0,
              "RADESYS": "FK5", "EQUINOX": 2000.0})
    return h


def write_part(d: Path, name: str, pointing_x: float, *, sigma: float, beam: float = 2.0,
               seed: int = 0, offset: float = 0.0, v0: float = 450e3) -> dict[str, str]:
    """One part: its box holds pb >= CUTOFF around the pointing (x offset in arcsec)."""
    half = math.ceil(PB_FWHM / 2 * math.sqrt(math.log(1 / CUTOFF) / math.log(2)) / CELL) + 2
    cx = round(pointing_x / CELL)
    x0, y0, n = cx - half, -half, 2 * half + 1
    x, y = pixel_offsets(x0, y0, n, n)
    pb = np.broadcast_to(pb_at(x, y, pointing_x), (NCHAN, n, n))
    noise = np.random.default_rng(seed).normal(0.0, sigma, (NCHAN, n, n))
    inside = pb >= CUTOFF
    pbcorr = np.where(inside, sky_at_beam(x, y, beam) + offset + noise / pb, np.nan)
    flat = pbcorr * pb
    h = header(x0, y0, n, n, beam, v0=v0)
    paths = {}
    for key, data in zip(MOSAIC_PRODUCTS, (pbcorr, flat, pb)):
        paths[key] = str(d / f"{name}_{key}.fits")
        fits.PrimaryHDU(data.astype(np.float32), h).writeto(paths[key])
    return paths


def out_paths(d: Path) -> dict[str, str]:
    return {k: str(d / f"mos_{k}.fits") for k in MOSAIC_PRODUCTS}


def on_mosaic_grid(h: fits.Header) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (arcsec) of the mosaic's pixels, from its header (global grid by construction)."""
    x0, y0 = round(1 - h["CRPIX1"]), round(1 - h["CRPIX2"])
    return pixel_offsets(x0, y0, h["NAXIS1"], h["NAXIS2"])


# ------------------------------------------------------------------ the pieces


def test_weights_are_pb_squared_over_sigma_squared() -> None:
    pb = np.array([1.0, 0.5, 0.0, np.nan, -0.1])
    assert mosaic_weights(pb, 2.0) == pytest.approx([0.25, 0.0625, 0.0, 0.0, 0.0])


def test_cube_noise_is_chauvmad_of_the_noise_not_the_signal() -> None:
    rng = np.random.default_rng(3)
    flat = rng.normal(0.0, 0.2, (4, 60, 60))
    flat[:, 20:30, 20:30] += 5.0            # bright emission is clipped as outliers
    flat[:, :5] = np.nan
    assert cube_noise(flat) == pytest.approx(0.2, rel=0.03)
    with pytest.raises(PhangsRunError, match="cannot measure the noise"):
        cube_noise(np.full((2, 3, 3), np.nan))


def test_common_grid_holds_every_part() -> None:
    a = header(-10, -5, 21, 11, 2.0)
    b = header(4, -8, 30, 20, 2.0)
    grid, shape = common_grid([a, b])
    assert shape == (20, 44)                 # y -8..11, x -10..33
    assert tuple(grid.wcs.crpix) == pytest.approx((11.0, 9.0))


def test_channels_are_aligned_by_velocity() -> None:
    v_in = np.array([0.0, 10.0, 20.0, 30.0])
    data = np.broadcast_to(v_in[:, None, None] * 2.0 + 1.0, (4, 2, 2))
    assert on_channels(data, v_in, v_in) is data
    out = on_channels(data, v_in, v_in + 5.0)      # half a channel later: linear, exact
    assert out[:3, 0, 0] == pytest.approx((v_in[:3] + 5.0) * 2.0 + 1.0)
    assert np.isnan(out[3]).all()                  # beyond the input's last channel
    with pytest.raises(PhangsRunError, match="channel widths"):
        on_channels(data, v_in, v_in * 2.0)


# ------------------------------------------------------------------ the mosaic


def test_one_part_is_returned_unchanged(tmp_path: Path) -> None:
    part = write_part(tmp_path, "a", 0.0, sigma=0.1, seed=1)
    linear_mosaic([part], out_paths(tmp_path))
    h, hp = (fits.getheader(p) for p in (out_paths(tmp_path)["pbcorr_trimmed_k"],
                                          part["pbcorr_trimmed_k"]))
    # trimmed to the measured pixels plus two: the part's box minus its blank margin
    dx, dy = round(hp["CRPIX1"] - h["CRPIX1"]), round(hp["CRPIX2"] - h["CRPIX2"])
    assert dx == dy == 1 and h["NAXIS1"] == hp["NAXIS1"] - 2
    window = (slice(None), slice(dy, dy + h["NAXIS2"]), slice(dx, dx + h["NAXIS1"]))
    measured = np.isfinite(fits.getdata(part["pbcorr_trimmed_k"]))[window]
    for key in ("pbcorr_trimmed_k", "pb_trimmed"):
        got = fits.getdata(out_paths(tmp_path)[key])
        # the mosaic's coverage is blank where nothing was measured
        want = np.where(measured, fits.getdata(part[key])[window], np.nan)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_two_noisy_parts_give_the_sky_within_the_predicted_noise(tmp_path: Path) -> None:
    s1, s2 = 0.10, 0.25
    parts = [write_part(tmp_path, "a", -SPACING / 2, sigma=s1, seed=1),
             write_part(tmp_path, "b", SPACING / 2, sigma=s2, seed=2)]
    summary = linear_mosaic(parts, out_paths(tmp_path))
    # chauvmad: the line channels' emission wings add a little; line-free channels rule
    assert summary["noise_k"] == pytest.approx([s1, s2], rel=0.05)
    hdu = fits.open(out_paths(tmp_path)["pbcorr_trimmed_k"])[0]
    h, mosaic = hdu.header, hdu.data.astype(float)
    assert h["BUNIT"] == "K" and h["BMAJ"] == pytest.approx(h["BMIN"]) == pytest.approx(2 / 3600)
    x, y = on_mosaic_grid(h)
    truth = sky_at_beam(x, y, 2.0)
    wsum = sum(np.where(pb_at(x, y, px) >= CUTOFF, pb_at(x, y, px) ** 2 / s ** 2, 0.0)
               for px, s in ((-SPACING / 2, s1), (SPACING / 2, s2)))
    finite = np.isfinite(mosaic)
    assert (finite == np.broadcast_to(wsum > 0, mosaic.shape)).all()   # the union of the parts
    z = ((mosaic - truth) * np.sqrt(wsum))[finite]     # residual in units of the predicted noise
    assert abs(z.mean()) < 0.05 and z.std() == pytest.approx(1.0, abs=0.05)
    # both pointings inside, and wider than either part
    for part in parts:
        assert h["NAXIS1"] > fits.getheader(part["pbcorr_trimmed_k"])["NAXIS1"]
    cy = round(h["CRPIX2"] - 1)
    for px in (-SPACING / 2, SPACING / 2):
        assert finite[:, cy, round(px / CELL + h["CRPIX1"] - 1)].all()
    # the coverage product: 1 at the most sensitive pixel; flat = pbcorr x coverage
    cov = fits.getdata(out_paths(tmp_path)["pb_trimmed"]).astype(float)
    assert np.nanmax(cov, axis=(1, 2)) == pytest.approx([1.0] * NCHAN)
    used = sum(np.where(pb_at(x, y, px) >= CUTOFF, pb_at(x, y, px) ** 2 / s ** 2, 0.0)
               for px, s in zip((-SPACING / 2, SPACING / 2), summary["noise_k"]))
    np.testing.assert_allclose(np.where(used > 0, np.sqrt(used / used.max()), np.nan), cov[0],
                               rtol=1e-4, equal_nan=True)
    flat = fits.getdata(out_paths(tmp_path)["flat_trimmed_k"]).astype(float)
    np.testing.assert_allclose(flat, mosaic * cov, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_weights_follow_pb_squared_over_sigma_squared(tmp_path: Path) -> None:
    """Noise-free pb-corrected parts off the sky by +1 and -1 K, flat cubes holding only noise of
    0.1 and 0.3 K: the mosaic is off by exactly the pb²/σ²-weighted mean of the offsets."""
    parts = []
    for name, px, sigma, offset, seed in (("a", -SPACING / 2, 0.1, 1.0, 4),
                                          ("b", SPACING / 2, 0.3, -1.0, 5)):
        part = write_part(tmp_path, name, px, sigma=0.0, offset=offset)
        flat = fits.open(part["flat_trimmed_k"], mode="update")
        flat[0].data = np.random.default_rng(seed).normal(0, sigma, flat[0].data.shape).astype(np.float32)
        flat.close()
        parts.append(part)
    linear_mosaic(parts, out_paths(tmp_path))
    hdu = fits.open(out_paths(tmp_path)["pbcorr_trimmed_k"])[0]
    x, y = on_mosaic_grid(hdu.header)
    w = [np.where(pb_at(x, y, px) >= CUTOFF, pb_at(x, y, px) ** 2 / s ** 2, 0.0)
         for px, s in ((-SPACING / 2, 0.1), (SPACING / 2, 0.3))]
    overlap = (w[0] > 0) & (w[1] > 0)
    expected = (w[0] - w[1]) / (w[0] + w[1])
    bias = hdu.data[2].astype(float) - sky_at_beam(x, y, 2.0)[2]
    assert overlap.sum() > 1000
    np.testing.assert_allclose(bias[overlap], expected[overlap], atol=0.03)
    # near a the quiet part dominates (+1), far from it the noisier b takes over (< 0); equal
    # weights would give 0 everywhere
    assert bias[overlap].max() > 0.9 and bias[overlap].min() < -0.3


def test_a_finer_part_is_convolved_to_the_common_beam(tmp_path: Path) -> None:
    parts = [write_part(tmp_path, "a", -SPACING / 2, sigma=0.0, beam=2.5),
             write_part(tmp_path, "b", SPACING / 2, sigma=0.0, beam=1.5)]
    summary = linear_mosaic(parts, out_paths(tmp_path))
    assert summary["beam_arcsec"] == pytest.approx(2.5)
    hdu = fits.open(out_paths(tmp_path)["pbcorr_trimmed_k"])[0]
    assert hdu.header["BMAJ"] * 3600 == pytest.approx(2.5)
    x, y = on_mosaic_grid(hdu.header)
    truth = sky_at_beam(x, y, 2.5)
    # away from the blank edges the convolution reached, the mosaic is the sky at 2.5"
    inner = np.hypot(x, y) < 8.0
    np.testing.assert_allclose(hdu.data[:, inner], truth[:, inner], rtol=0.01, atol=0.02)
    assert np.abs(sky_at_beam(x, y, 1.5) - truth)[:, inner].max() > 1.0  # the test can fail


def test_parts_on_shifted_channels_are_aligned(tmp_path: Path) -> None:
    parts = [write_part(tmp_path, "a", -SPACING / 2, sigma=0.0),
             write_part(tmp_path, "b", SPACING / 2, sigma=0.0, v0=460e3)]
    linear_mosaic(parts, out_paths(tmp_path))
    data = fits.getdata(out_paths(tmp_path)["pbcorr_trimmed_k"])
    h = fits.getheader(out_paths(tmp_path)["pbcorr_trimmed_k"])
    assert h["CRVAL3"] == 450e3 and data.shape[0] == NCHAN
    x, y = on_mosaic_grid(h)
    only_b = (pb_at(x, y, SPACING / 2) >= CUTOFF) & (pb_at(x, y, -SPACING / 2) < CUTOFF)
    # b's first channel is the mosaic's second; the mosaic's first has nothing of b
    np.testing.assert_allclose(data[3][only_b], sky_at_beam(x, y, 2.0)[2][only_b], rtol=1e-5)
    assert np.isnan(data[0][only_b]).all()


# ------------------------------------------------------------------ plan and task


@pytest.fixture
def sim_keys(tmp_path: Path) -> Path:
    """The key set `simulate_galaxy(with_tp=True, mosaic_parts=2)` writes, with empty MSs."""
    spec = GalaxySpec()
    parts = mosaic_parts_of(spec, 2)
    master = write_keys(spec, tmp_path / "keys", "simgal_12m_1.ms", "simgal_true_mom1.fits",
                        tp_file=spec.tp_file, parts=parts)
    for name in ["simgal_12m_1.ms"] + [p.ms_name for p in parts]:
        (tmp_path / "ms" / name).mkdir(parents=True)
    (tmp_path / "singledish").mkdir()
    (tmp_path / "singledish" / spec.tp_file).touch()
    return master


def postprocess_tasks(master: Path) -> dict[str, Task]:
    plan = P.plan_project(load_project(master))
    return {t.id: t for t in P.plan_tasks(plan) if t.stage == "postprocess"}


def test_feather_and_mosaic_tasks_carry_their_units(sim_keys: Path) -> None:
    sd = sim_keys.parents[1] / "singledish" / "simgal_tp_co21.fits"
    tasks = postprocess_tasks(sim_keys)
    assert set(tasks) == {f"postprocess/{t}/co21/{c}" for t in ("simgal", "simgal_mosaic")
                          for c in ("12m", "12m+tp")}
    feather = tasks["postprocess/simgal/co21/12m+tp"].params
    assert feather["feather"] and feather["interf_config"] == "12m"
    [unit] = feather["units"]
    assert unit["singledish"] == str(sd) and unit["stem"] == "simgal_12m+tp_co21"
    assert unit["imagename"].endswith("imaging/simgal/simgal_12m_co21")
    mosaic = tasks["postprocess/simgal_mosaic/co21/12m+tp"]
    assert mosaic.depends == ("imaging/simgal_1/co21/12m", "imaging/simgal_2/co21/12m")
    units = mosaic.params["units"]
    assert [u["target"] for u in units] == ["simgal_1", "simgal_2"]
    assert all(u["singledish"] == str(sd) for u in units)  # the mosaic's entry serves its parts
    assert units[1]["fits"]["pbcorr_trimmed_k"].endswith(
        "postprocess/simgal_2/simgal_2_12m+tp_co21_pbcorr_trimmed_k.fits")
    assert "singledish" not in tasks["postprocess/simgal_mosaic/co21/12m"].params["units"][0]


def test_a_missing_single_dish_cube_stops_the_plan(sim_keys: Path) -> None:
    (sim_keys.parents[1] / "singledish" / "simgal_tp_co21.fits").unlink()
    with pytest.raises(ConfigError, match="simgal_tp_co21.fits not found") as exc:
        P.plan_project(load_project(sim_keys))
    assert "singledish_key.txt:2" in str(exc.value) and "singledish_root" in exc.value.hint
    # only the stage that feathers needs it, and only while its products are to be made
    project = load_project(sim_keys)
    assert P.plan_project(project, stages=["stage_ms"])
    for target in ("simgal", "simgal_mosaic"):
        for path in plan_casa._postprocess_products(project, target, "co21", "12m+tp"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).touch()
    tasks = {t.id: t for t in P.plan_tasks(P.plan_project(project))}
    assert tasks["postprocess/simgal/co21/12m+tp"].params["units"][0]["singledish"] is None


def test_mosaic_task_runs_its_parts_then_combines_them(sim_keys: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The CASA postprocess of each part replaced by synthetic parts: the task makes the
    mosaic's products from the parts' and records the per-part CASA calls."""
    task = postprocess_tasks(sim_keys)["postprocess/simgal_mosaic/co21/12m"]
    calls = []

    def fake_casa(self: RunContext, stage: str, **params: object) -> dict[str, object]:
        unit = next(u for u in task.params["units"] if u["stem"] == params["stem"])
        Path(unit["outdir"]).mkdir(parents=True, exist_ok=True)
        i = len(calls)
        made = write_part(Path(unit["outdir"]), f"p{i}", (i - 0.5) * SPACING, sigma=0.1, seed=i)
        for key, path in made.items():
            Path(path).rename(unit["fits"][key])
        calls.append((stage, params))
        return {"fits": unit["fits"]}

    monkeypatch.setattr(RunContext, "casa", fake_casa)
    out = run_task(task, tmp_path / "work")
    assert [c[0] for c in calls] == ["postprocess", "postprocess"]
    assert all("singledish" not in c[1] for c in calls)
    assert out["products"] == task.outputs and all(Path(p).is_file() for p in task.outputs)
    state = read_task_state(tmp_path / "work", task.id)
    assert state["state"] == "done" and "linear_mosaic" in state["steps"]
    assert "linear mosaic of simgal_1, simgal_2" in state["note"]
    assert fits.getheader(task.outputs[0])["BUNIT"] == "K"


def test_a_task_planned_without_units_says_to_plan_again(tmp_path: Path) -> None:
    task = Task("postprocess", ("m", "co21", "12m"),
                params={"kind": "line", "mosaic": True, "feather": False, "parts": ["a", "b"],
                        "outputs": [str(tmp_path / "x.fits")]})
    with pytest.raises(PhangsRunError, match="planned without its postprocess units"):
        run_task(task, tmp_path)


# ------------------------------------------------------------------ continuum (2-D) parts
#
# A continuum part is what the CASA postprocess writes for an mfs image: 2-D (no spectral axis),
# K at a round beam, its frequency in the FREQ card.

FREQ_HZ = 242.5e9
SOURCES = ((-8.0, 2.0, 5.0), (0.0, 0.0, 3.0), (7.0, -3.0, 8.0), (3.0, 5.0, 2.0))  # x, y, K


def point_sources_at_beam(x: np.ndarray, y: np.ndarray, beam: float) -> np.ndarray:
    """Point sources seen at a round beam of FWHM ``beam``: each a Gaussian of the beam, its
    peak (K) as listed at 2" and scaling as 1/beam² (a surface brightness of a fixed flux)."""
    s = beam / FWHM
    return sum(peak * (2.0 / beam) ** 2 * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * s * s))
               for sx, sy, peak in SOURCES)


def image_header(x0: int, y0: int, n: int, beam: float) -> fits.Header:
    """A 2-D continuum product's header: the cube header without its spectral axis, FREQ set."""
    h = header(x0, y0, n, n, beam)
    for card in ("NAXIS3", "CTYPE3", "CRVAL3", "CDELT3", "CRPIX3", "CUNIT3", "SPECSYS",
                 "RESTFRQ"):
        del h[card]
    h["NAXIS"] = 2
    h["FREQ"] = FREQ_HZ
    return h


def write_image_part(d: Path, name: str, pointing_x: float, *, sigma: float,
                     beam: float = 2.0, seed: int = 0) -> dict[str, str]:
    half = math.ceil(PB_FWHM / 2 * math.sqrt(math.log(1 / CUTOFF) / math.log(2)) / CELL) + 2
    x0, y0, n = round(pointing_x / CELL) - half, -half, 2 * half + 1
    x, y = pixel_offsets(x0, y0, n, n)
    pb = pb_at(x, y, pointing_x)
    noise = np.random.default_rng(seed).normal(0.0, sigma, (n, n))
    pbcorr = np.where(pb >= CUTOFF, point_sources_at_beam(x, y, beam) + noise / pb, np.nan)
    h = image_header(x0, y0, n, beam)
    paths = {}
    for key, data in zip(MOSAIC_PRODUCTS, (pbcorr, pbcorr * pb, pb)):
        paths[key] = str(d / f"{name}_{key}.fits")
        fits.PrimaryHDU(data.astype(np.float32), h).writeto(paths[key])
    return paths


def test_two_continuum_images_give_the_sky_within_the_predicted_noise(tmp_path: Path) -> None:
    s1, s2 = 0.05, 0.15
    parts = [write_image_part(tmp_path, "a", -SPACING / 2, sigma=s1, seed=11),
             write_image_part(tmp_path, "b", SPACING / 2, sigma=s2, seed=12)]
    summary = linear_mosaic(parts, out_paths(tmp_path), name="m")
    # chauvmad clips the sources' peaks, not their faint wings: a few per cent high, alike
    # for both parts (the weights only need the ratio)
    assert summary["noise_k"] == pytest.approx([s1, s2], rel=0.1)
    assert summary["noise_k"][1] / summary["noise_k"][0] == pytest.approx(s2 / s1, rel=0.05)
    hdu = fits.open(out_paths(tmp_path)["pbcorr_trimmed_k"])[0]
    h, mosaic = hdu.header, hdu.data.astype(float)
    assert mosaic.ndim == 2 and h["NAXIS"] == 2 and "NAXIS3" not in h
    assert list(summary["shape"]) == list(mosaic.shape)
    assert (h["BUNIT"], h["FREQ"], h["OBJECT"]) == ("K", FREQ_HZ, "m")
    assert h["BMAJ"] == pytest.approx(h["BMIN"]) == pytest.approx(2 / 3600)
    x, y = on_mosaic_grid(h)
    truth = point_sources_at_beam(x, y, 2.0)
    wsum = sum(np.where(pb_at(x, y, px) >= CUTOFF, pb_at(x, y, px) ** 2 / s ** 2, 0.0)
               for px, s in ((-SPACING / 2, s1), (SPACING / 2, s2)))
    finite = np.isfinite(mosaic)
    assert (finite == (wsum > 0)).all()                # the union of the parts
    z = ((mosaic - truth) * np.sqrt(wsum))[finite]     # residual in units of the predicted noise
    assert abs(z.mean()) < 0.05 and z.std() == pytest.approx(1.0, abs=0.05)
    assert np.abs(z).max() < 6.0                       # every source where it belongs
    for sx, sy, peak in SOURCES:                       # all inside, each seen
        i, j = round(sy / CELL + h["CRPIX2"] - 1), round(sx / CELL + h["CRPIX1"] - 1)
        assert mosaic[i, j] == pytest.approx(peak, abs=6 / math.sqrt(wsum[i, j]))
    cov = fits.getdata(out_paths(tmp_path)["pb_trimmed"]).astype(float)
    flat_hdu = fits.open(out_paths(tmp_path)["flat_trimmed_k"])[0]
    assert cov.ndim == 2 and np.nanmax(cov) == pytest.approx(1.0)
    assert flat_hdu.header["FREQ"] == FREQ_HZ and flat_hdu.header["BUNIT"] == "K"
    np.testing.assert_allclose(flat_hdu.data, mosaic * cov, rtol=1e-4, atol=1e-6,
                               equal_nan=True)


def test_a_finer_continuum_image_is_convolved_to_the_common_beam(tmp_path: Path) -> None:
    parts = [write_image_part(tmp_path, "a", -SPACING / 2, sigma=0.0, beam=2.5),
             write_image_part(tmp_path, "b", SPACING / 2, sigma=0.0, beam=1.5)]
    # noise-free flat images have no noise to weigh by: give them the same small one
    for seed, part in enumerate(parts):
        with fits.open(part["flat_trimmed_k"], mode="update") as flat:
            flat[0].data = np.random.default_rng(seed).normal(
                0, 0.1, flat[0].data.shape).astype(np.float32)
    summary = linear_mosaic(parts, out_paths(tmp_path))
    assert summary["beam_arcsec"] == pytest.approx(2.5)
    hdu = fits.open(out_paths(tmp_path)["pbcorr_trimmed_k"])[0]
    assert hdu.data.ndim == 2 and hdu.header["BMAJ"] * 3600 == pytest.approx(2.5)
    x, y = on_mosaic_grid(hdu.header)
    truth = point_sources_at_beam(x, y, 2.5)
    # b (convolved) away from its blank edge (pb cutoff at 15"), three sources inside
    inner = np.hypot(x - SPACING / 2, y) < 11.0
    np.testing.assert_allclose(hdu.data[inner], truth[inner], atol=0.02)
    assert np.abs(point_sources_at_beam(x, y, 1.5) - truth)[inner].max() > 1.0


def test_mixing_images_and_cubes_is_an_error(tmp_path: Path) -> None:
    parts = [write_image_part(tmp_path, "a", 0.0, sigma=0.1),
             write_part(tmp_path, "b", SPACING, sigma=0.1)]
    with pytest.raises(PhangsRunError, match="2 and 3 axes"):
        linear_mosaic(parts, out_paths(tmp_path))


def continuum_mosaic_task(d: Path, feather: bool = False) -> Task:
    """A continuum mosaic postprocess task as the plan writes it (two parts, their units)."""
    units = []
    for part in ("m_1", "m_2"):
        outdir = d / "postprocess" / part
        stem = f"{part}_12m_cont"
        units.append({"target": part, "imagename": str(d / "imaging" / part / stem),
                      "outdir": str(outdir), "stem": stem,
                      "fits": {k: str(outdir / f"{stem}_{k}.fits") for k in MOSAIC_PRODUCTS},
                      **({"singledish": str(d / "sd" / f"{part}_cont.fits")} if feather else {})})
    outdir = d / "postprocess" / "m"
    return Task("postprocess", ("m", "cont", "12m"),
                params={"kind": "cont", "target": "m", "mosaic": True, "feather": feather,
                        "parts": ["m_1", "m_2"], "outdir": str(outdir), "stem": "m_12m_cont",
                        "units": units,
                        "outputs": [str(outdir / f"m_12m_cont_{k}.fits")
                                    for k in MOSAIC_PRODUCTS]})


@pytest.mark.parametrize("feather", [False, True])
def test_continuum_mosaic_task_postprocesses_its_parts_then_combines_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, feather: bool) -> None:
    """The CASA postprocess of each part replaced by a synthetic 2-D part: the task makes the
    2-D mosaic from them and records the per-part CASA calls. A feather config's task runs
    casa_tasks' feather stage on each part with that part's single-dish image."""
    task = continuum_mosaic_task(tmp_path, feather=feather)
    calls: list[tuple[str, dict[str, object]]] = []

    def fake_casa(self: RunContext, stage: str, **params: object) -> dict[str, object]:
        unit = next(u for u in task.params["units"] if u["stem"] == params["stem"])
        assert not Path(task.outputs[0]).exists()        # parts first, the mosaic after
        Path(unit["outdir"]).mkdir(parents=True, exist_ok=True)
        i = len(calls)
        made = write_image_part(Path(unit["outdir"]), f"p{i}", (i - 0.5) * SPACING,
                                sigma=0.1, seed=i)
        for key, path in made.items():
            Path(path).rename(unit["fits"][key])
        calls.append((stage, params))
        return {"fits": unit["fits"]}

    monkeypatch.setattr(RunContext, "casa", fake_casa)
    out = run_task(task, tmp_path / "work")
    stage_name = "feather" if feather else "postprocess"
    assert [(stage, p["imagename"], p["outdir"], p.get("singledish")) for stage, p in calls] == [
        (stage_name, u["imagename"], u["outdir"], u.get("singledish"))
        for u in task.params["units"]]
    assert out["products"] == task.outputs and all(Path(p).is_file() for p in task.outputs)
    h = fits.getheader(task.outputs[0])
    assert (h["NAXIS"], h["BUNIT"], h["FREQ"], h["OBJECT"]) == (2, "K", FREQ_HZ, "m")
    state = read_task_state(tmp_path / "work", task.id)
    assert state["state"] == "done" and "linear_mosaic" in state["steps"]
    assert "linear mosaic of m_1, m_2" in state["note"]

