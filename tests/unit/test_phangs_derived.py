"""PHANGS derived products on synthetic cubes with known signal and noise.

The cube: three 3-D Gaussian sources on Gaussian noise whose σ varies across the field and
along the band, a 3" round beam on 1" pixels, a radio-velocity axis of 2 km/s channels. Each
error formula is checked against the scatter of its estimate over many noise realisations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests._require import need

need("spectral_cube", "phangs")
need("radio_beam", "phangs")

import astropy.units as u
from astropy.io import fits

from hpcddf.errors import ConfigError
from hpcddf.phangs import convolution, masks, moments, noise

NZ, NY, NX = 60, 48, 48
DV_KMS = 2.0
BEAM_ARCSEC = 3.0
SOURCES = [  # (channel, y, x), peak 1 K, σ = 2.5 px, 3 channels
    (20, 14, 14), (38, 32, 34), (30, 34, 11)]
RESTFRQ = 230.538e9


def cube_header(nz: int = NZ, ny: int = NY, nx: int = NX, cdelt_arcsec: float = 1.0,
                dv_kms: float = DV_KMS, crval3_kms: float = 0.0, bunit: str = "K",
                crval1: float = 150.0, beam_arcsec: float | None = BEAM_ARCSEC) -> fits.Header:
    h = fits.Header()
    h["NAXIS"] = 3
    h["NAXIS1"], h["NAXIS2"], h["NAXIS3"] = nx, ny, nz
    h["CTYPE1"], h["CTYPE2"], h["CTYPE3"] = "RA---SIN", "DEC--SIN", "VRAD"
    h["CUNIT1"], h["CUNIT2"], h["CUNIT3"] = "deg", "deg", "m/s"
    h["CRPIX1"], h["CRPIX2"], h["CRPIX3"] = nx / 2 + 0.5, ny / 2 + 0.5, nz / 2 + 0.5
    h["CRVAL1"], h["CRVAL2"], h["CRVAL3"] = crval1, 2.0, crval3_kms * 1e3
    h["CDELT1"], h["CDELT2"] = -cdelt_arcsec / 3600, cdelt_arcsec / 3600
    h["CDELT3"] = dv_kms * 1e3
    h["RESTFRQ"] = RESTFRQ
    h["SPECSYS"] = "LSRK"
    h["BUNIT"] = bunit
    h["OBJECT"] = "SYNTH"
    if beam_arcsec:
        h["BMAJ"] = h["BMIN"] = beam_arcsec / 3600
        h["BPA"] = 0.0
    return h


def true_sigma() -> np.ndarray:
    y, x = np.mgrid[:NY, :NX]
    smap = 0.1 * (1.0 + 0.6 * x / NX + 0.3 * np.sin(np.pi * y / NY))
    sspec = 1.0 + 0.4 * np.sin(2 * np.pi * np.arange(NZ) / NZ)
    return smap[None] * sspec[:, None, None]


def true_signal() -> np.ndarray:
    z, y, x = np.mgrid[:NZ, :NY, :NX]
    sig = np.zeros((NZ, NY, NX))
    for z0, y0, x0 in SOURCES:
        sig += np.exp(-0.5 * (((z - z0) / 3.0) ** 2 + ((y - y0) / 2.5) ** 2
                              + ((x - x0) / 2.5) ** 2))
    return sig


def write(path, data, header):
    fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header).writeto(path, overwrite=True)
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The synthetic cube, a pure-noise twin, and the noise cube estimated from the former."""
    d = tmp_path_factory.mktemp("phangs")
    rng = np.random.default_rng(42)
    sigma = true_sigma()
    signal = true_signal()
    noise_real = rng.normal(size=sigma.shape) * sigma
    cube = write(d / "cube.fits", signal + noise_real, cube_header())
    blank = write(d / "blank.fits", rng.normal(size=sigma.shape) * sigma, cube_header())
    noise_path = noise.phangs_noise(cube, d / "cube_noise.fits")
    blank_noise = noise.phangs_noise(blank, d / "blank_noise.fits")
    return {"dir": d, "cube": cube, "blank": blank, "noise": noise_path,
            "blank_noise": blank_noise, "sigma": sigma, "signal": signal}


# ---------------------------------------------------------------- noise

def test_mad_zero_centered_ignores_positive_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20000) * 0.5
    x[:2000] += rng.uniform(2, 20, size=2000)        # 10 % of voxels carry bright emission
    assert noise.mad_zero_centered(x) == pytest.approx(0.5, rel=0.03)
    assert np.std(x) > 1.0                            # a plain rms would be far off
    valid = np.ones(x.size, bool)
    valid[:2000] = False
    assert noise.mad_zero_centered(x, valid) == pytest.approx(0.5, rel=0.03)


def test_noise_cube_recovers_spatial_and_spectral_sigma(synth):
    est = fits.getdata(synth["noise"])
    ratio = est / synth["sigma"]
    assert np.isfinite(est).all()
    assert np.median(np.abs(ratio - 1)) < 0.05
    assert np.percentile(np.abs(ratio - 1), 95) < 0.10
    h = fits.getheader(synth["noise"])
    assert h["BUNIT"] == "K"
    assert h["DATAMIN"] == pytest.approx(float(est.min()))
    assert h["DATAMAX"] == pytest.approx(float(est.max()))


def test_noise_cube_blank_outside_footprint(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.normal(size=(30, 40, 40)) * 0.2
    data[:, :, 30:] = np.nan                          # unobserved strip
    est = noise.noise_cube(data, iterations=2, box=8, spec_box=5,
                           bandpass_smooth_window=7)
    assert np.isnan(est[:, :, 30:]).all()
    assert np.nanmedian(est[:, :, :30]) == pytest.approx(0.2, rel=0.05)


# ---------------------------------------------------------------- masks

def test_nchan_thresh_mask_needs_consecutive_channels():
    snr = np.zeros((10, 1, 3))
    snr[4, 0, 0] = 9                                  # single-channel spike
    snr[4:6, 0, 1] = 5                                # two channels
    snr[2:5, 0, 2] = [5, np.nan, 5]                   # broken by a blank channel
    m = masks.nchan_thresh_mask(snr, 4.0, 2)
    assert not m[:, 0, 0].any()
    assert m[:, 0, 1].sum() == 2
    assert not m[:, 0, 2].any()


def test_reject_small_regions_volume_and_area():
    m = np.zeros((10, 10, 10), bool)
    m[0:6, 2, 2] = True                               # volume 6, area 1
    m[5, 5:8, 5:8] = True                             # volume 9, area 9
    assert masks.reject_small_regions(m, min_volume=7).sum() == 9
    assert masks.reject_small_regions(m, min_area=2).sum() == 9
    assert masks.reject_small_regions(m, min_volume=5).sum() == 15


def test_grow_mask_xy_and_v():
    m = np.zeros((9, 9, 9), bool)
    m[4, 4, 4] = True
    xy = masks.grow_mask(m, iters_xy=1)
    assert xy.sum() == 5 and xy[4].sum() == 5
    v = masks.grow_mask(m, iters_v=3)
    assert v[:, 4, 4].sum() == 3 and v.sum() == 3
    both = masks.grow_mask(m, iters_xy=1, iters_v=3)
    assert both.sum() == 7


def test_strict_mask_finds_sources_and_rejects_noise(synth, tmp_path):
    out = masks.strict_mask(synth["cube"], synth["noise"], out_path=tmp_path / "strict.fits")
    with fits.open(out) as hdul:
        mask = hdul[0].data
        assert mask.dtype == np.uint8
        assert hdul[0].header["BMAJ"] == pytest.approx(BEAM_ARCSEC / 3600)
    mask = mask.astype(bool)
    for z0, y0, x0 in SOURCES:
        assert mask[z0, y0, x0]
    snr_true = synth["signal"] / synth["sigma"]
    assert mask[snr_true > 4].mean() > 0.9            # the bright parts are found
    assert (snr_true[mask] < 0.1).mean() < 0.02       # almost nothing where there is no signal
    blank = masks.strict_mask(synth["blank"], synth["blank_noise"],
                              out_path=tmp_path / "blank_strict.fits")
    assert fits.getdata(blank).sum() == 0


def test_strict_mask_needs_coverage_for_seeds(synth, tmp_path):
    cov = np.ones((NZ, NY, NX), np.float32)
    cov[:, :24, :24] = 0.5                            # the first source sits here
    cov_path = write(tmp_path / "cov.fits", cov, cube_header())
    out = masks.strict_mask(synth["cube"], synth["noise"], cov_path,
                            out_path=tmp_path / "strict.fits")
    mask = fits.getdata(out).astype(bool)
    assert not mask[:, :20, :20].any()
    assert mask[SOURCES[1]] and mask[SOURCES[2]]


def test_strict_mask_refuses_noise_in_other_units(synth, tmp_path):
    data = fits.getdata(synth["noise"])
    bad = write(tmp_path / "n.fits", data, cube_header(bunit="Jy/beam"))
    with pytest.raises(ConfigError, match="Jy/beam"):
        masks.strict_mask(synth["cube"], bad, out_path=tmp_path / "s.fits")


def _blob_mask(header, world_v_kms, ra, dec, half=1):
    """A small mask cube on ``header``'s grid around a world position."""
    from astropy.wcs import WCS
    w = WCS(header)
    x, y, z = w.all_world2pix([[ra, dec, world_v_kms * 1e3]], 0)[0]
    m = np.zeros((header["NAXIS3"], header["NAXIS2"], header["NAXIS1"]), np.uint8)
    zi, yi, xi = (round(float(c)) for c in (z, y, x))
    m[zi - half:zi + half + 1, yi - half:yi + half + 1, xi - half:xi + half + 1] = 1
    return m


def test_broad_mask_joins_masks_on_different_grids(tmp_path):
    from astropy.wcs import WCS
    native = cube_header()
    coarse = cube_header(nz=30, ny=30, nx=30, cdelt_arcsec=2.0, dv_kms=4.0,
                         crval3_kms=2.0, crval1=150.0 + 3 / 3600)
    ra, dec, v = WCS(native).all_pix2world([[10, 30, 40]], 0)[0]
    a = write(tmp_path / "a.fits", _blob_mask(native, 0.0, 150.0, 2.0), native)
    b = write(tmp_path / "b.fits", _blob_mask(coarse, v / 1e3, ra, dec), coarse)
    joined = masks.join_masks(native, [a, b], "sum")
    assert joined.shape == (NZ, NY, NX)
    # the coarse blob (3 coarse pixels = 6", 3 coarse channels = 12 km/s) lands around
    # native (z, y, x) = (40, 30, 10), and nowhere near the native blob at the centre
    assert joined[40, 30, 10] == 1
    assert joined[40, 30, 10 + 8] == 0
    assert joined[NZ // 2, NY // 2, NX // 2] == 1
    assert joined.max() == 1
    out = masks.broad_mask(a, [a, b], out_path=tmp_path / "broad.fits")
    broad = fits.getdata(out)
    assert broad.dtype == np.uint8
    assert broad.sum() == (joined > 0).sum()
    assert broad[40, 30, 10] == 1 and broad[NZ // 2, NY // 2, NX // 2] == 1
    # somescales: more than 1/4 of the masks; with a third, empty mask a voxel in one of
    # three (1 > 0.75) stays, with four masks a voxel in one of four (1 > 1) goes
    empty = write(tmp_path / "e.fits", np.zeros((NZ, NY, NX), np.uint8), native)
    some3 = masks.broad_mask(a, [a, b, empty], out_path=tmp_path / "s3.fits",
                             recipe="somescales")
    some4 = masks.broad_mask(a, [a, b, empty, empty], out_path=tmp_path / "s4.fits",
                             recipe="somescales")
    assert fits.getdata(some3).sum() == broad.sum()
    assert fits.getdata(some4).sum() == 0


def test_join_masks_identical_grid_is_a_plain_sum(tmp_path):
    h = cube_header()
    rng = np.random.default_rng(5)
    m1 = (rng.random((NZ, NY, NX)) > 0.9).astype(np.uint8)
    m2 = (rng.random((NZ, NY, NX)) > 0.9).astype(np.uint8)
    paths = [write(tmp_path / "1.fits", m1, h), write(tmp_path / "2.fits", m2, h)]
    np.testing.assert_array_equal(masks.join_masks(h, paths), m1 + m2)
    np.testing.assert_array_equal(masks.join_masks(h, paths, "and"), (m1 & m2).astype(bool))
    with pytest.raises(ConfigError):
        masks.join_masks(h, paths, "xor")


def test_flat_mask_uses_the_given_window(synth, tmp_path):
    from astropy.wcs import WCS
    vf = np.zeros((24, 24))
    vf[:] = np.linspace(-30, 30, 24)[None, :]         # km/s, gradient along x
    vh = WCS(cube_header(ny=24, nx=24, cdelt_arcsec=2.0)).celestial.to_header()
    vh["BUNIT"] = "km/s"
    vpath = tmp_path / "vfield.fits"
    fits.PrimaryHDU(vf.astype(np.float32), vh).writeto(vpath)
    strict = write(tmp_path / "strict.fits", _blob_mask(cube_header(), 50.0, 150.0, 2.0),
                   cube_header())
    out = masks.flat_mask(synth["cube"], vpath, out_path=tmp_path / "flat.fits",
                          window="20km/s", mask_path=strict)
    mask = fits.getdata(out).astype(bool)
    v = (np.arange(NZ) - (NZ / 2 - 0.5)) * DV_KMS
    centre_v = np.interp(NX / 2 - 0.5, np.linspace(-0.5, NX - 0.5, 24), np.linspace(-30, 30, 24))
    col = mask[:, NY // 2, NX // 2 - 1:NX // 2 + 1].any(axis=1)
    inside = np.abs(v - centre_v) <= 10 - DV_KMS
    far = np.abs(v - centre_v) > 10 + DV_KMS
    assert col[inside].all() and not col[far & (np.abs(v - 50) > 4)].any()
    # the window key value is used: 20 km/s gives ~10 channels per spectrum, not 50 km/s' 25
    per_pixel = mask[:, 10:38, 10:38].sum(axis=0)
    assert 9 <= np.median(per_pixel) <= 11
    assert mask[:, NY // 2, NX // 2][np.abs(v - 50) < 1].all()     # OR'ed strict mask
    wide = masks.flat_mask(synth["cube"], vpath, out_path=tmp_path / "flat50.fits")
    assert np.median(fits.getdata(wide)[:, 10:38, 10:38].sum(axis=0)) >= 24


def test_window_parsing():
    assert masks.window_kms("30km/s") == 30.0
    assert masks.window_kms(12.5) == 12.5
    assert masks.window_kms(40000 * u.m / u.s) == pytest.approx(40.0)
    with pytest.raises(ConfigError):
        masks.window_kms("30 K")


# ---------------------------------------------------------------- moments on arrays

def line_cubes(amp, v0, width, sigma, n=2000, nz=64, dv=1.0, half=3.0, seed=7):
    """n noisy realisations of one Gaussian line, as a (nz, n, 1) cube, with a fixed mask."""
    rng = np.random.default_rng(seed)
    v = (np.arange(nz) - nz / 2) * dv
    line = amp * np.exp(-0.5 * ((v - v0) / width) ** 2)
    cube = line[:, None, None] + rng.normal(size=(nz, n, 1)) * sigma
    noise_cube = np.full(cube.shape, sigma)
    mask = np.broadcast_to((np.abs(v - v0) <= half * width)[:, None, None], cube.shape)
    return v, cube, noise_cube, mask


def test_moments_of_a_gaussian_line():
    amp, v0, width = 2.0, 3.3, 6.0
    v, cube, sig, mask = line_cubes(amp, v0, width, sigma=0.0, n=1, nz=128, half=6.0)
    m0, _ = moments.mom0(cube, sig, mask, v)
    m1, _ = moments.mom1(cube, sig, mask, v)
    m2, _ = moments.mom2(cube, sig, mask, v)
    e, _ = moments.ew(cube, sig, mask, v)
    assert m0[0, 0] == pytest.approx(amp * width * math.sqrt(2 * math.pi), rel=1e-3)
    assert m1[0, 0] == pytest.approx(v0, abs=1e-3)
    assert m2[0, 0] == pytest.approx(width, rel=1e-3)
    assert e[0, 0] == pytest.approx(width, rel=0.01)


@pytest.mark.parametrize("name", ["mom0", "mom1", "mom2"])
def test_moment_errors_match_monte_carlo(name):
    v, cube, sig, mask = line_cubes(2.0, 1.3, 5.0, sigma=0.1)
    value, error = moments.ALGORITHMS[name][0](cube, sig, mask, v)
    assert np.std(value) == pytest.approx(np.median(error), rel=0.2)


def test_reference_mom2_error_is_not_an_error_on_m2():
    """The fourth root of Var(M2²) has velocity units but is √σ(M2²), far from σ(M2)."""
    v, cube, sig, mask = line_cubes(2.0, 1.3, 5.0, sigma=0.1)
    scatter = np.std(moments.mom2(cube, sig, mask, v)[0])
    reference = np.median(moments.mom2_error_reference(cube, sig, mask, v))
    assert reference > 3 * scatter


def test_ew_error_matches_monte_carlo():
    # a narrow bright line: the peak channel is the same in every realisation, which the
    # first-order formula assumes (for broad flat-topped lines the max is a selection)
    v, cube, sig, mask = line_cubes(3.0, 0.3, 1.5, sigma=0.05)
    value, error = moments.ew(cube, sig, mask, v)
    assert np.std(value) == pytest.approx(np.median(error), rel=0.2)
    dv, tpk = 1.0, 3.0
    ref = np.sqrt(np.sum(mask[:, 0, 0]) * 0.05 ** 2 * dv ** 2 / (2 * np.pi * tpk ** 2)
                  + (np.mean(value) ** 2 - np.mean(value) * dv / np.sqrt(2 * np.pi)) * 0.05 ** 2)
    assert ref != pytest.approx(np.std(value), rel=0.2)   # the reference's second term


def test_tpeak_vpeak_vquad():
    v, cube, sig, mask = line_cubes(3.0, 0.3, 1.5, sigma=0.05)
    tpk, etpk = moments.tpeak(cube, sig, mask, v)
    assert np.mean(tpk) == pytest.approx(3.0 * math.exp(-0.5 * (0.3 / 1.5) ** 2), rel=0.03)
    assert np.std(tpk) == pytest.approx(np.median(etpk), rel=0.2)
    smooth, esmooth = moments.tpeak(cube, sig, mask, v, window_kms=3.0)
    assert np.std(smooth) == pytest.approx(np.median(esmooth), rel=0.2)
    assert np.median(esmooth) == pytest.approx(0.05 / math.sqrt(3), rel=1e-6)
    vp, evp = moments.vpeak(cube, sig, mask, v)
    assert (vp == 0.0).mean() > 0.99 and np.all(evp == 1.0)    # the peak channel
    vq, evq = moments.vquad(cube, sig, mask, v)
    assert np.mean(vq) == pytest.approx(0.3, abs=0.05)
    assert np.std(vq) == pytest.approx(np.median(evq), rel=0.2)


def test_vquad_is_the_parabola_vertex():
    v = np.arange(10, dtype=float) * 2.0                    # 2 km/s channels
    spec = 5.0 - 0.5 * ((np.arange(10) - 4.3) ** 2)        # vertex at channel 4.3
    cube = spec[:, None, None]
    value, _ = moments.vquad(cube, np.full(cube.shape, 0.1), None, v)
    assert value[0, 0] == pytest.approx(4.3 * 2.0)         # PHANGS' δ would give 4.5 (clipped)


def test_tpeak_searches_the_mask_channel_range_everywhere():
    v = np.arange(20, dtype=float)
    cube = np.zeros((20, 1, 2))
    cube[3, :, :] = 9.0                                     # outside the range
    cube[12, :, 0] = 2.0
    cube[15, :, 1] = 1.0                                    # last masked channel, other pixel
    mask = np.zeros(cube.shape, bool)
    mask[10:16, 0, 0] = True                                # only pixel 0 is masked
    tpk, _ = moments.tpeak(cube, np.ones(cube.shape), mask, v)
    vp, _ = moments.vpeak(cube, np.ones(cube.shape), mask, v)
    np.testing.assert_allclose(tpk[0], [2.0, 1.0])
    np.testing.assert_allclose(vp[0], [12.0, 15.0])


def test_mom0_limits():
    v = np.arange(10, dtype=float) * 2.5
    cube = np.ones((10, 1, 3))
    cube[:, 0, 2] = np.nan                                  # not observed
    sig = np.full(cube.shape, 0.2)
    mask = np.zeros(cube.shape, bool)
    mask[2:6, 0, 0] = True
    m0, e0 = moments.mom0(cube, sig, mask, v)
    assert m0[0, 0] == pytest.approx(4 * 2.5) and e0[0, 0] == pytest.approx(0.4 * 2.5)
    assert m0[0, 1] == 0.0
    assert e0[0, 1] == pytest.approx(0.2 * math.sqrt(10 / 2.5) * 2.5)
    assert np.isnan(m0[0, 2]) and np.isnan(e0[0, 2])
    m0, _ = moments.mom0(cube, sig, mask, v, include_limits=False)
    assert np.isnan(m0[0, 1])


def test_mom1wprior_fills_believable_gaps():
    nan = np.nan
    strict = np.array([[10.0, nan, nan, nan]])
    broad = np.array([[11.0, 20.0, 20.0, 80.0]])
    bm0 = np.array([[5.0, 5.0, 1.0, 5.0]])
    prior = np.array([[10.0, 15.0, 15.0, 15.0]])
    value, error = moments.mom1wprior(strict, np.full((1, 4), 0.1), broad, np.full((1, 4), 0.5),
                                      bm0, np.ones((1, 4)), prior)
    np.testing.assert_array_equal(value, [[10.0, 20.0, nan, nan]])
    np.testing.assert_array_equal(error, [[0.1, 0.5, 0.1, 0.1]])


# ---------------------------------------------------------------- moments on files

def test_write_moment_files(synth, tmp_path):
    strict = masks.strict_mask(synth["cube"], synth["noise"], out_path=tmp_path / "strict.fits")
    out, err = moments.write_moment(synth["cube"], synth["noise"], strict, "mom0",
                                    tmp_path / "mom0.fits", tmp_path / "emom0.fits")
    with fits.open(out) as hdul:
        data, h = hdul[0].data, hdul[0].header
    assert h["BITPIX"] == -32 and data.shape == (NY, NX)
    assert h["BUNIT"] == "K km/s" and h["BTYPE"] == "Moment0"
    assert h["CHANWDTH"] == pytest.approx(DV_KMS)
    assert h["BMAJ"] == pytest.approx(BEAM_ARCSEC / 3600)
    z0, y0, x0 = SOURCES[1]
    assert data[y0, x0] == pytest.approx(3.0 * math.sqrt(2 * math.pi) * DV_KMS, rel=0.15)
    assert fits.getheader(err)["BTYPE"] == "Moment0Error"
    m1, _ = moments.write_moment(synth["cube"], synth["noise"], strict, "mom1",
                                 tmp_path / "mom1.fits", None)
    v0 = (z0 - (NZ / 2 - 0.5)) * DV_KMS
    assert fits.getdata(m1)[y0, x0] == pytest.approx(v0, abs=1.0)
    tp, _ = moments.write_moment(synth["cube"], synth["noise"], strict, "tpeak",
                                 tmp_path / "tpeak.fits", None, window_kms=12.5)
    assert fits.getheader(tp)["BUNIT"] == "K"
    with pytest.raises(ConfigError, match="unknown moment"):
        moments.write_moment(synth["cube"], synth["noise"], strict, "mom3", tmp_path / "x.fits")


def test_write_moment_converts_jy_per_beam(synth, tmp_path):
    from radio_beam import Beam
    beam = Beam(BEAM_ARCSEC * u.arcsec)
    k_per_jy = beam.jtok(RESTFRQ * u.Hz).value
    data = fits.getdata(synth["cube"]) / k_per_jy
    sig = fits.getdata(synth["noise"]) / k_per_jy
    cube = write(tmp_path / "jy.fits", data, cube_header(bunit="Jy/beam"))
    nse = write(tmp_path / "jy_noise.fits", sig, cube_header(bunit="Jy/beam"))
    a, _ = moments.write_moment(synth["cube"], synth["noise"], None, "tpeak",
                                tmp_path / "k.fits", None)
    b, _ = moments.write_moment(cube, nse, None, "tpeak", tmp_path / "j.fits", None)
    np.testing.assert_allclose(fits.getdata(b), fits.getdata(a), rtol=1e-3)


def test_write_mom1wprior_files(synth, tmp_path):
    h2 = fits.Header()
    h2.update(convolution.read_cube(synth["cube"]).wcs.celestial.to_header())
    maps = {}
    for name, value in [("strict_mom1", np.nan), ("strict_emom1", np.nan),
                        ("broad_mom1", 5.0), ("broad_emom1", 0.3), ("broad_mom0", 10.0),
                        ("broad_emom0", 1.0)]:
        maps[name] = tmp_path / f"{name}.fits"
        fits.PrimaryHDU(np.full((NY, NX), value, np.float32), h2).writeto(maps[name])
    hp = cube_header(ny=12, nx=12, cdelt_arcsec=4.0)       # a coarser prior field
    from astropy.wcs import WCS
    maps["prior_mom1"] = tmp_path / "prior.fits"
    fits.PrimaryHDU(np.full((12, 12), 0.0, np.float32),
                    WCS(hp).celestial.to_header()).writeto(maps["prior_mom1"])
    out, err = moments.write_moment(None, None, None, "mom1wprior", tmp_path / "m.fits",
                                    tmp_path / "e.fits", maps_to_pass=maps)
    inner = fits.getdata(out)[8:40, 8:40]
    assert np.allclose(inner, 5.0) and np.allclose(fits.getdata(err)[8:40, 8:40], 0.3)


# ---------------------------------------------------------------- convolution

def test_target_beam():
    b = convolution.target_beam(ang_res_arcsec=15.0)
    assert b.major.to_value(u.arcsec) == pytest.approx(15.0)
    assert b.minor == b.major
    p = convolution.target_beam(phys_res_pc=150.0, distance_mpc=10.0)
    assert p.major.to_value(u.arcsec) == pytest.approx(150 / 1e7 * 206264.806, rel=1e-6)
    with pytest.raises(ConfigError):
        convolution.target_beam(phys_res_pc=150.0)
    with pytest.raises(ConfigError):
        convolution.target_beam(ang_res_arcsec=15.0, phys_res_pc=150.0)


def point_source_cube(tmp_path, peak=2.0):
    y, x = np.mgrid[:NY, :NX]
    s = BEAM_ARCSEC / math.sqrt(8 * math.log(2))              # beam σ in 1" pixels
    img = peak * np.exp(-0.5 * (((y - 24) / s) ** 2 + ((x - 24) / s) ** 2))
    data = np.repeat(img[None], 8, axis=0)
    data[:, 4:12, 4:12] = np.nan                              # a blank patch
    return write(tmp_path / "point.fits", data, cube_header(nz=8))


def test_smooth_cube_to_target_beam(tmp_path):
    src = point_source_cube(tmp_path)
    target = convolution.target_beam(phys_res_pc=300.0, distance_mpc=10.0)   # 6.19"
    res = convolution.smooth_cube(src, tmp_path / "out.fits", target,
                                  coverage_path=tmp_path / "cov.fits",
                                  coverage2d_path=tmp_path / "cov2d.fits", distance_mpc=10.0)
    assert res.action == "convolved"
    theta = target.major.to_value(u.arcsec)
    with fits.open(res.out_path) as hdul:
        data, h = hdul[0].data, hdul[0].header
    assert h["BMAJ"] * 3600 == pytest.approx(theta) and h["BMIN"] == h["BMAJ"]
    assert h["DIST_MPC"] == 10.0 and h["BUNIT"] == "K"
    # a point source in K: peak brightness scales with 1/beam area
    assert np.nanmax(data[3]) == pytest.approx(2.0 * (BEAM_ARCSEC / theta) ** 2, rel=0.02)
    assert np.isnan(data[:, 4:12, 4:12]).all()                # NaN stays where it was
    cov = fits.getdata(tmp_path / "cov.fits")
    assert cov[0, 24, 24] == pytest.approx(1.0, abs=1e-3)
    assert cov[0, 0, 24] < 0.8 and cov[0, 8, 8] < 0.2         # map edge, blank patch
    cov2d = fits.getdata(tmp_path / "cov2d.fits")
    assert cov2d.shape == (NY, NX)
    np.testing.assert_allclose(cov2d, cov.mean(axis=0), rtol=1e-5)


def test_smooth_cube_copies_within_tolerance_and_refuses_finer(tmp_path):
    src = point_source_cube(tmp_path)
    res = convolution.smooth_cube(src, tmp_path / "copy.fits",
                                  convolution.target_beam(ang_res_arcsec=3.2))
    assert res.action == "copied"
    np.testing.assert_array_equal(fits.getdata(res.out_path), fits.getdata(src))
    assert fits.getheader(res.out_path)["BMAJ"] * 3600 == pytest.approx(BEAM_ARCSEC)
    with pytest.raises(ConfigError, match="finer than the native"):
        convolution.smooth_cube(src, tmp_path / "x.fits",
                                convolution.target_beam(ang_res_arcsec=2.0))
    assert not (tmp_path / "x.fits").exists()
