"""PHANGS end to end through hpcddf's engine: `hpcddf phangs simulate` writes the galaxy, its MS
(CASA's simulator) and key files; `hpcddf phangs submit KEYDIR` runs every stage (staging,
imaging, postprocess in the CASA environment, derived products in hpcddf's own) as tasks. The
run is the one tests/_phangs_chain.py makes on the local Slurm for test_phangs_slurm_chain (which
checks that Slurm runs the same tasks with the same parameters as the local default; the local
default's own engine runs PHANGS in test_phangs_postprocess). The products are checked against the model:
moment-0 flux 0.92-0.98 of the model's (12 m data miss some extended flux), moment-1 within 2 km/s rms,
the noise cube within 10 % of the noise the cube actually holds, units and beams in headers.
The later derived rounds too: mom1wprior (strict mom1 with gaps filled from the broad mom1),
the velocity field against the true rotation, mom0 on the flat strict mask, and the cube
shuffled about the velocity field.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.convolution import Gaussian2DKernel, convolve_fft
from astropy.io import fits
from astropy.wcs import WCS
from reproject import reproject_interp

from hpcddf.phangs.run_common import read_task_state
from tests._phangs_chain import Chain

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(3600)]

CASA_ENV = Path(os.environ.get("HPCDDF_CASA_ENV", "/work/casa-env"))
STEM = "simgal_12m_co21"
CO21_HZ = 230.538e9


def hpcddf(*args: str, timeout: float = 3400) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HPCDDF_CASA_ENV": str(CASA_ENV)}
    return subprocess.run([sys.executable, "-m", "hpcddf", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def project(phangs_chain: Chain) -> Path:
    return phangs_chain.root


def _derived(root: Path, ext: str) -> Path:
    return root / "derived" / "simgal" / f"{STEM}_{ext}.fits"


def test_every_task_is_done_and_says_so(project):
    out = hpcddf("phangs", "status", str(project / "keys"), "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {r["stage"] for r in rows} == {"stage_ms", "stage_line", "imaging", "postprocess", "derived",
                                          "release"}
    assert all(r["state"] == "done" for r in rows), rows
    # the release (the simulated keys set release_root): the cube and the derived maps, in
    # release_root/<target>/ under their own names, and the release's done marker
    release = project / "release" / "simgal"
    cube = project / "postprocess" / "simgal" / f"{STEM}_pbcorr_trimmed_k.fits"
    assert (release / cube.name).read_bytes() == cube.read_bytes()
    assert (release / _derived(project, "strict_mom0").name).is_file()
    assert (release / f".{STEM}.release.json").is_file()
    same = hpcddf("status", "--phangs", str(project / "keys"), "--json")
    assert same.returncode == 0 and json.loads(same.stdout) == rows


def test_products_have_units_and_round_beams(project):
    cube = project / "postprocess" / "simgal" / f"{STEM}_pbcorr_trimmed_k.fits"
    h = fits.getheader(cube)
    assert h["BUNIT"].strip().upper() == "K" and h["BMAJ"] == pytest.approx(h["BMIN"])
    assert h["CTYPE3"].startswith(("VRAD", "VELO"))
    for ext, unit in (("strict_mom0", "K km / s"), ("strict_emom0", "K km / s"), ("strict_mom1", "km / s"),
                      ("strict_emom1", "km / s"), ("noise", "K"), ("broad_tpeak", "K")):
        h = fits.getheader(_derived(project, ext))
        assert u.Unit(h["BUNIT"]) == u.Unit(unit), (ext, h["BUNIT"])
        assert h["BMAJ"] == pytest.approx(fits.getheader(cube)["BMAJ"]), ext
    for ext in ("strictmask", "broadmask", "coverage2d", "2as_strict_mom0", "150pc_strict_mom0"):
        assert _derived(project, ext).is_file(), ext
    assert fits.getheader(_derived(project, "2as"))["BMAJ"] * 3600 == pytest.approx(2.0, rel=1e-3)


def _jy_per_k(h: fits.Header) -> float:
    """Jy/beam per K for the cube's beam at the line's rest frequency."""
    area = (math.pi * (h["BMAJ"] * u.deg) * (h["BMIN"] * u.deg) / (4 * math.log(2))).to(u.sr)
    return (1 * u.K).to(u.Jy, u.brightness_temperature(CO21_HZ * u.Hz, area)).value


def _truth(project: Path, h: fits.Header, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The true mom0 (Jy km/s per pixel of the map) and mom1, at the map's beam and grid."""
    t0 = fits.open(project / "model" / "simgal_true_mom0.fits")[0]
    t1 = fits.getdata(project / "model" / "simgal_true_mom1.fits")
    tpix = abs(t0.header["CDELT2"]) * 3600.0
    kernel = Gaussian2DKernel(h["BMAJ"] * 3600 / tpix / math.sqrt(8 * math.log(2)))
    m0 = np.nan_to_num(t0.data)
    c0 = convolve_fft(m0, kernel)
    c1 = convolve_fft(m0 * np.nan_to_num(t1), kernel) / np.where(c0 > 0, c0, np.nan)
    w = WCS(h).celestial
    r0, _ = reproject_interp((c0, WCS(t0.header).celestial), w, shape_out=shape)
    r1, _ = reproject_interp((c1, WCS(t0.header).celestial), w, shape_out=shape)
    return r0 * (abs(h["CDELT2"]) * 3600 / tpix) ** 2, r1


# The fraction of the model's line flux a 12 m-only moment-0 map holds. The 12 m array alone
# misses extended flux (no baseline under ~15 m: nothing larger than ~10" is recovered):
# casa-here.md measured 0.917 in a S/N > 4 mask and 0.979 as the median pixel ratio of the
# bright region, the upper end. This galaxy gives 0.953 (strict) to 0.955 (broad mask), the same
# to five digits in every CI run (fixed seeds); the noise in the mask moves it by 0.1 % (sigma
# 0.15-0.17 Jy km/s). Two-sided: above 0.98 flux was added that 12 m data cannot hold; below
# 0.92 more was lost than the array loses.
TWELVE_M_ONLY = (0.92, 0.98)


def test_moment0_flux_is_the_models(project):
    hdu = fits.open(_derived(project, "broad_mom0"))[0]
    h = hdu.header
    ppbeam = math.pi * h["BMAJ"] * h["BMIN"] / (4 * math.log(2)) / h["CDELT2"] ** 2
    flux = float(np.nansum(hdu.data)) * _jy_per_k(h) / ppbeam
    truth = json.loads((project / "model" / "model_truth.json").read_text())
    total = fits.getdata(project / "model" / "simgal_true_mom0.fits").sum()
    assert total == pytest.approx(150.0, rel=1e-3), truth.get("total_flux_jy_kms")
    assert TWELVE_M_ONLY[0] <= flux / total <= TWELVE_M_ONLY[1], flux


def test_moment1_follows_the_rotation(project):
    hdu = fits.open(_derived(project, "strict_mom1"))[0]
    mom1 = hdu.data.astype(float)
    true0, true1 = _truth(project, hdu.header, mom1.shape)
    bright = (true0 > 0.2 * np.nanmax(true0)) & np.isfinite(mom1) & np.isfinite(true1)
    assert bright.sum() > 300
    assert float(np.sqrt(np.mean((mom1[bright] - true1[bright]) ** 2))) < 2.0
    assert np.percentile(mom1[bright], 99) - np.percentile(mom1[bright], 1) > 80.0  # it rotates


def test_noise_cube_is_the_noise_the_cube_holds(project):
    """Inside the primary beam's flat centre, the noise cube against the robust scatter of the
    voxels no mask claims (line-free: outside the broad mask)."""
    cube = fits.getdata(project / "postprocess" / "simgal" / f"{STEM}_pbcorr_trimmed_k.fits").astype(float)
    pb = fits.getdata(project / "postprocess" / "simgal" / f"{STEM}_pb_trimmed.fits").astype(float)
    noise = fits.getdata(_derived(project, "noise")).astype(float)
    broad = fits.getdata(_derived(project, "broadmask")).astype(bool)
    centre = np.broadcast_to(pb.reshape((-1,) + pb.shape[-2:])[0] > 0.9, cube.shape)
    free = centre & ~broad & np.isfinite(cube)
    free[:2] = free[-2:] = False  # the regrid's edge channels are quieter
    empirical = 1.4826 * np.median(np.abs(cube[free]))
    assert float(np.nanmedian(noise[free])) == pytest.approx(empirical, rel=0.10)


def _jy_kms(path: Path) -> float:
    """Total flux (Jy km/s) of a mom0 map in K km/s."""
    hdu = fits.open(path)[0]
    h = hdu.header
    ppbeam = math.pi * h["BMAJ"] * h["BMIN"] / (4 * math.log(2)) / h["CDELT2"] ** 2
    return float(np.nansum(hdu.data)) * _jy_per_k(h) / ppbeam


def test_later_rounds_are_in_the_task_state(project):
    """broad mom1 (round 1), mom1wprior (round 2), the velocity field, the flat strict masks and
    their mom0 (round 3): recorded as the derived task's products, and there."""
    state = read_task_state(project, "derived/simgal/co21/12m")
    assert state and state["state"] == "done", state
    products = {Path(p).name for p in state["products"]}
    for tag in ("", "2as_", "150pc_"):
        for ext in ("broad_mom1", "broad_emom1", "mom1wprior", "emom1wprior", "flatstrictmask",
                    "flatstrict_mom0", "flatstrict_emom0"):
            assert f"{STEM}_{tag}{ext}.fits" in products, (tag, ext)
    assert f"{STEM}_vfield.fits" in products
    missing = [p for p in state["products"] if not Path(p).exists()]
    assert not missing, missing


def test_velocity_field_follows_the_rotation(project):
    """Finest mom1wprior first, then coarser ones, then the window key's true mom1: against
    the true mom1 at the native beam wherever both have a value."""
    hdu = fits.open(_derived(project, "vfield"))[0]
    assert u.Unit(hdu.header["BUNIT"]) == u.Unit("km / s")
    vfield = hdu.data.astype(float)
    h1 = fits.getheader(_derived(project, "strict_mom1"))
    assert vfield.shape == (h1["NAXIS2"], h1["NAXIS1"])
    _, true1 = _truth(project, h1, vfield.shape)
    both = np.isfinite(vfield) & np.isfinite(true1)
    assert both.sum() > 1000
    assert float(np.sqrt(np.mean((vfield[both] - true1[both]) ** 2))) < 2.0
    assert np.percentile(vfield[both], 99) - np.percentile(vfield[both], 1) > 80.0


def test_mom1wprior_keeps_the_strict_mom1_and_fills_its_gaps(project):
    """Where the strict mom1 has a value mom1wprior is it (with its error); the gaps it fills
    take the broad mom1 (at the native resolution the strict mask misses the faint edge)."""
    for tag in ("", "150pc_"):
        strict = fits.getdata(_derived(project, f"{tag}strict_mom1")).astype(float)
        wprior = fits.getdata(_derived(project, f"{tag}mom1wprior")).astype(float)
        assert u.Unit(fits.getheader(_derived(project, f"{tag}mom1wprior"))["BUNIT"]) == u.Unit("km / s")
        has = np.isfinite(strict)
        assert np.isfinite(wprior).sum() >= has.sum() > 300, tag
        np.testing.assert_allclose(wprior[has], strict[has], rtol=0, atol=1e-3, err_msg=tag)
        estrict = fits.getdata(_derived(project, f"{tag}strict_emom1")).astype(float)
        ewprior = fits.getdata(_derived(project, f"{tag}emom1wprior")).astype(float)
        np.testing.assert_allclose(ewprior[has], estrict[has], rtol=0, atol=1e-3, err_msg=tag)
        filled = np.isfinite(wprior) & ~has
        broad = fits.getdata(_derived(project, f"{tag}broad_mom1")).astype(float)
        np.testing.assert_allclose(wprior[filled], broad[filled], rtol=0, atol=1e-3, err_msg=tag)
        if not tag:
            assert filled.sum() > 20  # the fill path ran


def test_flat_strict_mom0_holds_at_least_the_strict_flux(project):
    """The flat mask is the strict mask OR a window around the velocity field, so its mom0 only
    adds the voxels of that window: their flux is signal plus noise, so >= the strict mom0's
    down to 3 sigma of their noise (beam-correlated: variance sum(sigma^2) x pixels per beam);
    in all, 0.92-0.98 of the model's 150 Jy km/s, as the other 12 m moment-0 maps."""
    strict_mask = fits.getdata(_derived(project, "strictmask")).astype(bool)
    flat_mask = fits.getdata(_derived(project, "flatstrictmask")).astype(bool)
    assert (strict_mask <= flat_mask).all()
    extra = flat_mask & ~strict_mask
    assert extra.sum() > 1000  # the window adds voxels: the comparison below means something
    noise = fits.getdata(_derived(project, "noise")).astype(float)
    h = fits.getheader(_derived(project, "strict_mom0"))
    ppbeam = math.pi * h["BMAJ"] * h["BMIN"] / (4 * math.log(2)) / h["CDELT2"] ** 2
    hn = fits.getheader(_derived(project, "noise"))
    dv = abs(hn["CDELT3"]) * u.Unit(hn["CUNIT3"]).to(u.km / u.s)
    sigma = math.sqrt(float(np.nansum(noise[extra] ** 2)) * ppbeam) * dv * _jy_per_k(h) / ppbeam
    flat = _jy_kms(_derived(project, "flatstrict_mom0"))
    strict = _jy_kms(_derived(project, "strict_mom0"))
    assert flat >= strict - 3.0 * sigma, (flat, strict, sigma)
    assert TWELVE_M_ONLY[0] <= flat / 150.0 <= TWELVE_M_ONLY[1], flat


def test_shuffled_cube_stacks_the_rotating_disk_on_the_central_channel(project):
    """The derived key's shuffle_kw {} makes the native cube shuffled about the velocity field:
    stacked over the disk, the line of every sightline lands on the v = 0 channel, the stack is
    narrower than the unshuffled one (rotation spreads that over +-58 km/s), and it holds the
    same flux."""
    hdu = fits.open(_derived(project, "shuffled"))[0]
    h = hdu.header
    assert (h["CTYPE3"], h["CRVAL3"], h["BUNIT"].strip()) == ("VRAD", 0.0, "K")
    centre = int(h["CRPIX3"]) - 1
    cube = fits.getdata(project / "derived" / "simgal" / f"{STEM}.fits").astype(float)
    shuffled = hdu.data.astype(float)
    assert shuffled.shape == cube.shape  # the default axis: the cube's channel count
    disk = np.isfinite(fits.getdata(_derived(project, "strict_mom0")).astype(float))
    assert disk.sum() > 300
    stack = np.nansum(np.where(np.isfinite(shuffled), shuffled, 0.0)[:, disk], axis=1)
    plain = np.nansum(np.nan_to_num(cube)[:, disk], axis=1)
    assert int(np.argmax(stack)) == centre
    near = np.abs(np.arange(len(stack)) - centre) <= 3  # +-30 km/s around the field
    assert stack[near].sum() == pytest.approx(plain.sum(), rel=0.05)

    def width(s: np.ndarray) -> float:
        return float((s > 0.5 * s.max()).sum())
    assert width(stack) < 0.5 * width(plain)
