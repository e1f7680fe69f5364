"""Feathering with total power and the linear mosaic of parts, with the real CASA 6.7.

One simulated project (``simulate_galaxy(with_tp=True, mosaic_parts=2)``): the CO(2-1) disk of
test_phangs_casa (150 Jy km/s) observed by the 12 m array as a 3-pointing mosaic (target
``simgal``) and again as two single pointings 12.5" apart (targets ``simgal_1``/``simgal_2``,
the parts of the linear mosaic ``simgal_mosaic``), plus a total-power cube (the model convolved
with a 28.6" beam on 4" pixels, Jy/beam) for ``simgal`` and ``simgal_mosaic``. Images are 256
pixels of 0.3" so that they hold the TP-smeared emission (feather takes the total flux from the
single dish on the interferometric grid). ``submit_phangs`` on the local site runs staging,
imaging and postprocess of every target and config (12m, 12m+tp) through the engine; the
derived products of the feathered mosaic then run in-process. About 4-5 minutes on 2 cores.

Checks against the model: the feathered cube's flux is within 5 % of the truth and closer to it
than the 12 m cube's (which misses the extended flux); the mosaic covers both parts' footprints
at a round beam in K, its S/N-masked flux is within 12 % of the truth and its total flux the
parts' (a linear mosaic neither loses nor doubles flux); a single-dish cube in K feathers like
the same cube in Jy/beam; one without a brightness unit is a one-line error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

from hpcddf.engine.sites import load_site
from hpcddf.errors import ConfigError, StepFailed
from hpcddf.phangs import plan as P
from hpcddf.phangs.casaenv import CasaEnv, find_casa_env, run_casa
from hpcddf.phangs.galaxy import GalaxySpec, simulate_galaxy
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.project import Project
from hpcddf.phangs.run import run_task
from hpcddf.phangs.run_common import read_task_state
from hpcddf.phangs.submit import submit_phangs

pytestmark = pytest.mark.timeout(3600)

CASA_ENV = Path(os.environ.get("HPCDDF_CASA_ENV", "/work/casa-env"))
TRUTH_JYKMS = 150.0
C_KMS = 299_792.458
STAGES = ["stage_ms", "stage_line", "imaging", "postprocess"]


@dataclass
class Run:
    root: Path
    project: Project
    work: Path
    truth: dict[str, Any]
    env: CasaEnv

    def post(self, target: str, config: str, kind: str = "pbcorr_trimmed_k") -> Path:
        return self.root / "postprocess" / target / f"{target}_{config}_co21_{kind}.fits"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    try:
        env = find_casa_env(CASA_ENV)
    except ConfigError as exc:
        if os.environ.get("HPCDDF_REQUIRE_CASA") == "1":
            pytest.fail(f"the CASA environment is required here but not usable: {exc}")
        pytest.skip(f"no CASA environment ({exc})")
    root = tmp_path_factory.mktemp("phangs-post") / "gal"
    sim = simulate_galaxy(root, GalaxySpec(noise_jy=0.14, integration="60s", imsize=256),
                          casa_env=env, with_tp=True, mosaic_parts=2)
    doc = submit_phangs(load_site("local"), sim.master_key.parent, stages=STAGES,
                        casa_env=str(CASA_ENV))
    return Run(root=sim.outdir, project=load_project(sim.master_key), work=Path(doc["work_dir"]),
               truth=json.loads(sim.truth.read_text()), env=env)


# ------------------------------------------------------------------ measuring


def jy_beam(path: Path) -> tuple[np.ndarray, fits.Header, float, float]:
    """The K cube back in Jy/beam (astropy's equivalency, independent of casa_tasks), its
    header, pixels per beam and channel width (km/s)."""
    hdu = fits.open(path)[0]
    h = hdu.header
    vel = ((np.arange(h["NAXIS3"]) + 1 - h["CRPIX3"]) * h["CDELT3"] + h["CRVAL3"]) / 1000.0
    area = (math.pi * (h["BMAJ"] * u.deg) * (h["BMIN"] * u.deg) / (4 * math.log(2))).to(u.sr)
    k_per_jy = np.array([(1 * u.Jy).to(u.K, u.brightness_temperature(
        h["RESTFRQ"] * (1 - v / C_KMS) * u.Hz, area)).value for v in vel])
    ppb = area.to(u.deg ** 2).value / abs(h["CDELT1"] * h["CDELT2"])
    return hdu.data.astype(float) / k_per_jy[:, None, None], h, ppb, abs(vel[1] - vel[0])


def total_flux(path: Path) -> float:
    """Every finite voxel (Jy km/s): the feathered cube's large scales count."""
    data, _, ppb, dv = jy_beam(path)
    return float(np.nansum(data) / ppb * dv)


def masked_flux(path: Path) -> float:
    """Inside an S/N mask (S/N > 3 in two channels, grown into S/N > 1.5) from the flat cube's
    noise, as test_phangs_casa measures: the negative bowls of missing short spacings and the
    noise amplified at the pb edge stay out."""
    data, _, ppb, dv = jy_beam(path)
    flat, _, _, _ = jy_beam(Path(str(path).replace("pbcorr_trimmed_k", "flat_trimmed_k")))
    noise = np.array([1.4826 * np.nanmedian(np.abs(c - np.nanmedian(c))) for c in flat])
    snr = np.nan_to_num(flat / noise[:, None, None])
    run2 = np.ones((2, 1, 1), bool)
    seeds = ndimage.binary_opening(snr > 3, structure=run2)
    mask = ndimage.binary_propagation(seeds, mask=ndimage.binary_opening(snr > 1.5, structure=run2))
    return float(np.where(mask, data, 0.0).sum() / ppb * dv)


# ------------------------------------------------------------------ the engine ran it all


def test_every_task_is_done_with_its_steps(run: Run) -> None:
    ids = [t.id for t in P.plan_tasks(P.plan_project(run.project, stages=STAGES))]
    states = {i: read_task_state(run.work, i) for i in ids}
    assert all(s and s["state"] == "done" for s in states.values()), states
    feather = states["postprocess/simgal/co21/12m+tp"]["steps"]["feather"]
    assert feather["singledish"]["unit_in"] == "Jy/beam"
    assert feather["singledish"]["sd_bmaj"] == pytest.approx(28.6)
    assert feather["singledish"]["uncovered_fraction"] == 0.0
    mosaic = states["postprocess/simgal_mosaic/co21/12m+tp"]["steps"]
    assert {"feather simgal_1", "feather simgal_2", "linear_mosaic"} <= set(mosaic)
    for part in ("simgal_1", "simgal_2"):   # each part was feathered on its own grid
        assert run.post(part, "12m+tp").is_file()


# ------------------------------------------------------------------ feathering


def test_feathering_restores_the_flux_the_12m_array_misses(run: Run) -> None:
    assert run.truth["singledish"]["line_flux_in_map_jykms"] == pytest.approx(TRUTH_JYKMS,
                                                                              rel=1e-3)
    interf = total_flux(run.post("simgal", "12m"))
    feathered = total_flux(run.post("simgal", "12m+tp"))
    assert abs(feathered - TRUTH_JYKMS) < abs(interf - TRUTH_JYKMS)
    assert feathered == pytest.approx(TRUTH_JYKMS, rel=0.05)
    assert interf < 0.97 * TRUTH_JYKMS      # there was missing flux to restore


def test_feathered_cube_keeps_the_interferometric_grid_beam_and_units(run: Run) -> None:
    h12, htp = (fits.getheader(run.post("simgal", c)) for c in ("12m", "12m+tp"))
    for key in ("NAXIS1", "NAXIS2", "NAXIS3", "CRPIX1", "CRPIX2", "CRVAL3", "CDELT3", "BMAJ",
                "BMIN"):
        assert htp[key] == pytest.approx(h12[key]), key
    assert htp["BUNIT"].strip() == "K" and htp["BMAJ"] == pytest.approx(htp["BMIN"])
    # the same footprint: the pb cutoff of the interferometric cube
    finite = [np.isfinite(fits.getdata(run.post("simgal", c))) for c in ("12m", "12m+tp")]
    assert (finite[0] == finite[1]).all()


def _tp_copy(run: Run, dest: Path, **cards: Any) -> Path:
    src = run.root / "singledish" / "simgal_tp_co21.fits"
    hdu = fits.open(src)[0]
    data, h = hdu.data.astype(np.float64), hdu.header.copy()
    if cards.pop("kelvin", False):
        freq = (np.arange(h["NAXIS3"]) + 1 - h["CRPIX3"]) * h["CDELT3"] + h["CRVAL3"]
        area = (math.pi * (h["BMAJ"] * u.deg) ** 2 / (4 * math.log(2))).to(u.sr)
        k = np.array([(1 * u.Jy).to(u.K, u.brightness_temperature(f * u.Hz, area)).value
                      for f in freq])
        data = data * k[:, None, None]
        h["BUNIT"] = "K"
    for key, value in cards.items():
        if value is None:
            del h[key]
        else:
            h[key] = value
    fits.PrimaryHDU(data.astype(np.float32), h).writeto(dest)
    return dest


def test_a_single_dish_cube_in_kelvin_feathers_like_jy_per_beam(run: Run, tmp_path: Path) -> None:
    sd = _tp_copy(run, tmp_path / "tp_k.fits", kelvin=True)
    base = run.root / "imaging" / "simgal" / "simgal_12m_co21"
    out = run_casa(run.env, "feather", tmp_path / "logs", imagename=base, outdir=tmp_path,
                   stem="k", singledish=sd)
    assert out["singledish"]["unit_in"] == "K"
    got = fits.getdata(out["fits"]["pbcorr_trimmed_k"])
    want = fits.getdata(run.post("simgal", "12m+tp"))
    peak = np.nanmax(np.abs(want))
    np.testing.assert_allclose(got, want, atol=2e-3 * peak, equal_nan=True)


def test_a_single_dish_cube_without_a_unit_is_a_one_line_error(run: Run, tmp_path: Path) -> None:
    sd = _tp_copy(run, tmp_path / "tp_nounit.fits", BUNIT=None)
    base = run.root / "imaging" / "simgal" / "simgal_12m_co21"
    with pytest.raises(StepFailed, match="brightness unit") as exc:
        run_casa(run.env, "feather", tmp_path / "logs", imagename=base, outdir=tmp_path,
                 stem="bad", singledish=sd)
    assert "tp_nounit.fits" in str(exc.value)
    assert not list(tmp_path.glob("bad_*.fits"))


# ------------------------------------------------------------------ the linear mosaic


def test_mosaic_covers_both_parts_at_a_round_beam_in_kelvin(run: Run) -> None:
    h = fits.getheader(run.post("simgal_mosaic", "12m"))
    assert h["BUNIT"].strip() == "K" and h["BMAJ"] == pytest.approx(h["BMIN"])
    assert h["CTYPE3"].startswith(("VRAD", "VELO")) and h["OBJECT"] == "simgal_mosaic"
    mosaic = fits.getdata(run.post("simgal_mosaic", "12m"))
    wcs = WCS(h).celestial
    for part in ("simgal_1", "simgal_2"):
        hp = fits.getheader(run.post(part, "12m"))
        assert h["BMAJ"] >= hp["BMAJ"] * (1 - 1e-6)          # the common beam: the largest
        assert h["NAXIS1"] > hp["NAXIS1"]
        # every pixel a part measured is measured in the mosaic
        measured = np.isfinite(fits.getdata(run.post(part, "12m"))).any(axis=0)
        yy, xx = np.nonzero(measured)
        mx, my = wcs.world_to_pixel_values(*WCS(hp).celestial.pixel_to_world_values(xx, yy))
        mx, my = np.round(mx).astype(int), np.round(my).astype(int)
        assert np.isfinite(mosaic[:, my, mx]).any(axis=0).mean() > 0.99
        # and the pointing centre itself
        pointing = run.truth["mosaic"]["parts"][part]
        px, py = wcs.world_to_pixel_values(pointing["ra_deg"], pointing["dec_deg"])
        assert np.isfinite(mosaic[:, round(float(py)), round(float(px))]).all()
    cov = fits.getdata(run.post("simgal_mosaic", "12m", "pb_trimmed"))
    assert np.nanmax(cov, axis=(1, 2)) == pytest.approx([1.0] * cov.shape[0])


def test_mosaic_flux_is_the_models_and_its_parts(run: Run) -> None:
    """12 m only, in an S/N mask: 0.926 of the model measured (the same in every CI run: fixed
    seeds; noise in the mask ~0.1 %). The 12 m array misses extended flux (0.917-0.979 in
    casa-here.md), the mosaic's edges are noisier: 0.90-0.98, two-sided (12 m data cannot hold
    more than ~0.98 of this disc)."""
    mosaic = run.post("simgal_mosaic", "12m")
    assert 0.90 <= masked_flux(mosaic) / TRUTH_JYKMS <= 0.98
    parts = [total_flux(run.post(p, "12m")) for p in ("simgal_1", "simgal_2")]
    assert total_flux(mosaic) == pytest.approx(float(np.mean(parts)), rel=0.03)


def test_feathered_mosaic_is_closer_to_the_truth(run: Run) -> None:
    """Every voxel: the 12 m mosaic holds 0.883 of the model (its negative bowls count), the
    feathered one 0.960 (measured; the same in every run). Feathering restores the large
    scales, so the feathered total is between 0.94 and 1.00: it cannot exceed the model by more
    than the noise (0.1 %), and below 0.94 the single dish added too little."""
    interf = total_flux(run.post("simgal_mosaic", "12m"))
    feathered = total_flux(run.post("simgal_mosaic", "12m+tp"))
    assert abs(feathered - TRUTH_JYKMS) < abs(interf - TRUTH_JYKMS)
    assert 0.94 <= feathered / TRUTH_JYKMS <= 1.00


def test_derived_products_of_the_feathered_mosaic(run: Run) -> None:
    """The derived stage takes a feathered mosaic like any cube (run here, in-process)."""
    task = next(t for t in P.plan_tasks(P.plan_project(run.project, targets=["simgal_mosaic"],
                                                       stages=["derived"]))
                if t.id == "derived/simgal_mosaic/co21/12m+tp")
    run_task(task, run.work)
    assert read_task_state(run.work, task.id)["state"] == "done"
    mom0 = run.root / "derived" / "simgal_mosaic" / "simgal_mosaic_12m+tp_co21_broad_mom0.fits"
    hdu = fits.open(mom0)[0]
    h = hdu.header
    assert u.Unit(h["BUNIT"]) == u.Unit("K km / s")
    area = (math.pi * (h["BMAJ"] * u.deg) * (h["BMIN"] * u.deg) / (4 * math.log(2))).to(u.sr)
    jy_per_k = (1 * u.K).to(u.Jy, u.brightness_temperature(230.538e9 * u.Hz, area)).value
    ppb = area.to(u.deg ** 2).value / h["CDELT2"] ** 2
    # the broad-mask moment 0 of the feathered cube: 0.945 of the model measured, 1.5 % below
    # the cube's total (0.960) by the faint wings the mask leaves out; with the cube's bounds
    # (0.94-1.00) less those wings: 0.93-0.99
    assert 0.93 <= float(np.nansum(hdu.data)) * jy_per_k / ppb / TRUTH_JYKMS <= 0.99
