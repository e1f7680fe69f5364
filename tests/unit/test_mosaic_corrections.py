"""The mosaic's release corrections (hpcddf/mosaic/corrections.py) on synthetic fields with known
truth: facet shifts, bad-facet and astromap blanking, noise per facet, a common restoring beam
and a flux scale from the quality step, each measured on the mosaic image itself.

The fields are small (10" cells, 40" beam, 324 px, 3 x 3 facets of 108 px); field B lies 0.4 deg
west of field A, so A's western facets (2, 5, 8: high pixel x) overlap B.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from hpcddf.errors import HpcddfError
from hpcddf.mosaic.combine import PRODUCTS, MosaicInput, MosaicOptions, MosaicResult, make_mosaic, output_header
from hpcddf.mosaic.corrections import CorrectionError, CorrectionOptions, field_corrections, quality_scale
from hpcddf.mosaic.pointings import Pointing
from hpcddf.mosaic.survey_sim import FieldSpec, SkySource, facet_of_pixel, field_wcs, primary_beam, write_field

CELL, RES, NPIX, PB, NOISE = 10.0, 40.0, 324, 0.6, 5e-4
SPEC = FieldSpec(CELL, RES, NPIX, PB, NOISE, facets=3)
FULL = PRODUCTS["full"]
A = Pointing("A", 150.0, 50.0)
B = Pointing("B", 150.0 - 0.4 / math.cos(math.radians(50.0)), 50.0)   # 0.4 deg west of A
MID = Pointing("AB", (A.ra + B.ra) / 2, 50.0)
SHIFT = (12.0, -8.0)          # arcsec east, north: 0.36 beam
SHIFTED_FACET = 5             # A's middle western facet, all of it in B's beam
BAD_FACET = 5
FAST = MosaicOptions(block=64)
FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
BEAMCUT_RADIUS = PB / 2 * math.sqrt(math.log(1 / 0.3) / math.log(2))   # deg: beam 0.3


# ---------------------------------------------------------------- helpers

def sky_at(p: Pointing, x: float, y: float, flux: float = 1.0, spec: FieldSpec = SPEC) -> SkySource:
    """A source at pixel (x, y) of field ``p``."""
    ra, dec = field_wcs(p, spec).all_pix2world([[x, y]], 0)[0]
    return SkySource(float(ra), float(dec), flux)


def pixel_of(p: Pointing, s: SkySource, spec: FieldSpec = SPEC) -> tuple[float, float]:
    x, y = field_wcs(p, spec).all_world2pix([[s.ra, s.dec]], 0)[0]
    return float(x), float(y)


def separation(p: Pointing, s: SkySource) -> float:
    from hpcddf.mosaic.pointings import separations
    return float(separations(Pointing("s", s.ra, s.dec), [p])[0])


def write(root: Path, p: Pointing, sources: list[SkySource], seed: int, spec: FieldSpec = SPEC,
          **kw) -> MosaicInput:
    """A field with the full product's file names (what field_corrections reads)."""
    ip, ap = write_field(root / p.id, p, spec, sources, FULL.int_image, FULL.app_image, seed=seed, **kw)
    return MosaicInput(p.id, str(ip), str(ap))


def corrected(inp: MosaicInput, opts: CorrectionOptions) -> MosaicInput:
    wd = Path(inp.int_path).parent
    return MosaicInput(inp.name, inp.int_path, inp.app_path,
                       corrections=field_corrections(wd, inp.name, FULL.tessel, opts))


def mosaic(inputs: list[MosaicInput], header, out: Path, opts: MosaicOptions = FAST) -> tuple[MosaicResult, np.ndarray, np.ndarray, WCS]:
    out.mkdir(parents=True, exist_ok=True)
    res = make_mosaic(inputs, header, out / "m.fits", out / "w.fits", opts)
    with fits.open(res.mosaic) as h:
        image, wcs = np.asarray(h[0].data, dtype=float), WCS(h[0].header)
    return res, image, np.asarray(fits.getdata(res.weights), dtype=float), wcs


def history(path: str) -> list[str]:
    return [str(x) for x in fits.getheader(path)["HISTORY"]]


def fit_source(image: np.ndarray, wcs: WCS, s: SkySource, half: int = 6,
               sigma0: float = RES / CELL / FWHM) -> tuple[float, float, float, float]:
    """Circular Gaussian fit around the true position: (east, north) offset of the fitted centre
    from the truth (arcsec), peak (Jy/beam) and FWHM (arcsec)."""
    from scipy.optimize import curve_fit
    x, y = wcs.all_world2pix([[s.ra, s.dec]], 0)[0]
    xi, yi = int(round(x)), int(round(y))
    cut = image[yi - half:yi + half + 1, xi - half:xi + half + 1]
    assert cut.shape == (2 * half + 1, 2 * half + 1) and np.isfinite(cut).all(), "source not in the mosaic"
    yy, xx = np.mgrid[yi - half:yi + half + 1, xi - half:xi + half + 1]

    def model(xy, a, x0, y0, sig):
        return a * np.exp(-((xy[0] - x0) ** 2 + (xy[1] - y0) ** 2) / (2 * sig ** 2))
    p, _ = curve_fit(model, (xx.ravel(), yy.ravel()), cut.ravel(), p0=(cut.max(), x, y, sigma0))
    ra, dec = wcs.all_pix2world([[p[1], p[2]]], 0)[0]
    east = ((ra - s.ra + 180.0) % 360.0 - 180.0) * math.cos(math.radians(s.dec)) * 3600.0
    north = (dec - s.dec) * 3600.0
    cell = abs(wcs.wcs.cdelt[1]) * 3600.0
    return float(east), float(north), float(p[0]), float(abs(p[3]) * FWHM * cell)


def aperture_flux(image: np.ndarray, wcs: WCS, s: SkySource, res: float = RES, cell: float = CELL) -> float:
    """Integrated flux of a restored point source: aperture sum / beam area in pixels."""
    sig = res / cell / FWHM
    x, y = wcs.all_world2pix([[s.ra, s.dec]], 0)[0]
    xi, yi, r = int(round(x)), int(round(y)), int(math.ceil(2.2 * sig * FWHM)) + 1
    cut = image[yi - r:yi + r + 1, xi - r:xi + r + 1]
    assert np.isfinite(cut).all(), "source not in the mosaic"
    yy, xx = np.mgrid[yi - r:yi + r + 1, xi - r:xi + r + 1]
    inside = (xx - x) ** 2 + (yy - y) ** 2 <= (2.2 * sig * FWHM) ** 2
    return float(cut[inside].sum() / (2 * math.pi * sig ** 2))


def in_field_pixels(p: Pointing, out_wcs: WCS, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (x, y) of field ``p`` under every output pixel."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    ra, dec = out_wcs.all_pix2world(xx, yy, 0)
    return field_wcs(p, SPEC).all_world2pix(ra, dec, 0)


def facet_interior(p: Pointing, facet: int, out_wcs: WCS, shape: tuple[int, int], margin: float = 3.0) -> np.ndarray:
    """Output pixels inside facet ``facet`` of field ``p``, at least ``margin`` input pixels
    from its edges (the bilinear reprojection mixes across an edge)."""
    x, y = in_field_pixels(p, out_wcs, shape)
    side = SPEC.npix / SPEC.facets
    i, j = facet % SPEC.facets, facet // SPEC.facets
    return ((x > i * side - 0.5 + margin) & (x < (i + 1) * side - 0.5 - margin)
            & (y > j * side - 0.5 + margin) & (y < (j + 1) * side - 0.5 - margin))


def mid_header(max_sep: float = 0.8, cell: float = CELL, res: float = RES, centre: Pointing = MID):
    """A grid centred between A and B reaching 0.46 deg: both fields' beams fit on it."""
    return output_header(centre.id, centre.ra, centre.dec, max_sep, cell, res)


# ---------------------------------------------------------------- surveys (written once)

@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A and B; A's facet 5 (all in B's beam) is offset by SHIFT: A draws its sources SHIFT the
    other way and its facet-offset.txt holds SHIFT. Badfacets.txt: A's facet 0, B's facet 8
    (far from the overlap; used by the workers test only)."""
    root = tmp_path_factory.mktemp("shifted")
    in_facet = [sky_at(A, x, y) for x, y in ((232, 125), (235, 195), (255, 160), (268, 132), (268, 192))]
    others = [sky_at(A, 180, 140), sky_at(A, 110, 200), sky_at(A, 150, 60),       # A only
              sky_at(B, 220, 150), sky_at(B, 200, 215)]                            # B only
    sources = in_facet + others
    for s in in_facet:
        assert facet_of_pixel(SPEC, *pixel_of(A, s)) == SHIFTED_FACET
        assert max(separation(A, s), separation(B, s)) < 0.95 * BEAMCUT_RADIUS  # in the overlap
    inputs = [write(root, A, sources, seed=1, offsets={SHIFTED_FACET: SHIFT}), write(root, B, sources, seed=2)]
    (root / "A" / "Badfacets.txt").write_text("0\n")
    (root / "B" / "Badfacets.txt").write_text("8\n")
    return inputs, in_facet, others


@pytest.fixture(scope="module")
def bad_field(tmp_path_factory):
    """A and B; the source ``wrong`` in A's facet 5 is 1.5 Jy in A's image only (1.0 in B's)."""
    root = tmp_path_factory.mktemp("bad")
    wrong = sky_at(A, 265, 160)
    good = [sky_at(A, 180, 140), sky_at(A, 120, 210)]
    assert facet_of_pixel(SPEC, *pixel_of(A, wrong)) == BAD_FACET
    assert max(separation(A, wrong), separation(B, wrong)) < 0.95 * BEAMCUT_RADIUS
    a = write(root, A, [SkySource(wrong.ra, wrong.dec, 1.5)] + good, seed=3)
    b = write(root, B, [wrong] + good, seed=4)
    return a, b, wrong


def blank_marker(wd: Path, how: str) -> None:
    if how == "Badfacets.txt":
        (wd / "Badfacets.txt").write_text(f"{BAD_FACET}\n")
    else:  # the offsets step's table: Bad per direction (direction = facet here)
        Table({"Facet_id": np.arange(9), "RA_offset": np.zeros(9), "DEC_offset": np.zeros(9),
               "Bad": np.arange(9) == BAD_FACET}).write(wd / "pslocal-facet_offsets.fits")


# ---------------------------------------------------------------- 1. shifts

def test_facet_shifts_put_every_source_on_its_true_position(shifted, tmp_path):
    inputs, in_facet, others = shifted
    beam = 0.05 * RES
    header = mid_header()
    _, plain, _, wcs = mosaic(inputs, header, tmp_path / "plain")
    opts = CorrectionOptions(apply_shifts=True)
    corr = [corrected(i, opts) for i in inputs]
    assert corr[0].corrections.shifted and not corr[1].corrections.shifted
    res, fixed, _, _ = mosaic(corr, header, tmp_path / "fixed")
    for s in in_facet + others:
        east, north, _, _ = fit_source(fixed, wcs, s)
        assert math.hypot(east, north) < beam, (s, east, north)
    for s in in_facet:  # uncorrected: pulled towards A's displaced copy (A's weight: 20-50 %)
        east, north, _, _ = fit_source(plain, wcs, s)
        assert math.hypot(east, north) > beam, (s, east, north)
        assert east < 0 and north > 0   # A drew it at truth - SHIFT: west and north
    for s in others:
        east, north, _, _ = fit_source(plain, wcs, s)
        assert math.hypot(east, north) < beam, (s, east, north)
    assert any("A 1 facets shifted (max 14.42\")" in h for h in history(res.mosaic)), history(res.mosaic)


# ---------------------------------------------------------------- 2. bad facets

@pytest.mark.parametrize("how", ["Badfacets.txt", "offsets table"])
def test_a_bad_facet_gets_no_weight_and_its_wrong_flux_stays_out(bad_field, tmp_path, how):
    a, b, wrong = bad_field
    wd = tmp_path / "A"
    wd.mkdir()
    shutil.copy(Path(a.int_path).parent / FULL.tessel, wd / FULL.tessel)
    blank_marker(wd, how)
    corr = field_corrections(wd, "A", FULL.tessel, CorrectionOptions(blank_bad_facets=True))
    assert corr.blanked == [BAD_FACET]
    a_blank = MosaicInput("A", a.int_path, a.app_path, corrections=corr)
    header = mid_header()
    res, img, w, wcs = mosaic([a_blank, b], header, tmp_path / "blank")
    _, _, w_b, _ = mosaic([b], header, tmp_path / "b-only")
    _, img_all, w_all, _ = mosaic([a, b], header, tmp_path / "all")
    facet = facet_interior(A, BAD_FACET, wcs, w.shape)
    assert facet.sum() > 5000
    assert np.array_equal(w[facet], w_b[facet])                         # A adds nothing there
    assert ((w_all - w_b)[facet] > 0.2 * w_b[facet]).mean() > 0.5       # ... where it would
    elsewhere = facet_interior(A, 4, wcs, w.shape) & (w_all > 0)
    assert np.allclose(w[elsewhere], w_all[elsewhere], rtol=1e-6)        # A's other facets stay
    assert aperture_flux(img, wcs, wrong) == pytest.approx(1.0, rel=0.02)
    assert aperture_flux(img_all, wcs, wrong) > 1.1
    assert any(f"A facets {BAD_FACET} blanked" in h for h in history(res.mosaic))


# ---------------------------------------------------------------- 3. common beam

BEAM_SPEC = dict(cell_arcsec=5.0, npix=324, pb_fwhm_deg=0.3, noise=NOISE)   # 12 px across a 60" beam
A3 = Pointing("A3", 150.0, 50.0)
B3 = Pointing("B3", 150.0 - 0.2 / math.cos(math.radians(50.0)), 50.0)


@pytest.fixture(scope="module")
def two_beams(tmp_path_factory):
    """A3 restored with a 40" beam, B3 with a 60" beam, 0.2 deg apart (5" cells); a 1 Jy source
    between them, where both beams are 0.74."""
    root = tmp_path_factory.mktemp("beams")
    centre = Pointing("AB3", (A3.ra + B3.ra) / 2, 50.0)
    src = SkySource(centre.ra, centre.dec + 0.01, 1.0)
    inputs = []
    for p, beam, seed in ((A3, 40.0, 5), (B3, 60.0, 6)):
        spec = FieldSpec(resolution_arcsec=beam, bmaj_arcsec=beam, **BEAM_SPEC)
        ip, ap = write_field(root / p.id, p, spec, [src], "int.fits", "app.fits", seed=seed)
        inputs.append(MosaicInput(p.id, str(ip), str(ap)))
    header = output_header(centre.id, centre.ra, centre.dec, 0.4, 5.0, 40.0)
    return inputs, header, src


def test_inputs_are_convolved_to_the_common_beam(two_beams, tmp_path):
    inputs, header, src = two_beams
    res, img, _, wcs = mosaic(inputs, header, tmp_path / "auto")
    head = fits.getheader(res.mosaic)
    assert head["BMAJ"] * 3600 == pytest.approx(60.0) and head["BMIN"] * 3600 == pytest.approx(60.0)
    assert res.warnings == []
    _, _, peak, fwhm = fit_source(img, wcs, src, half=12, sigma0=60.0 / 5.0 / FWHM)
    assert peak == pytest.approx(1.0, rel=0.02)
    assert fwhm == pytest.approx(60.0, rel=0.05)
    assert any("A3 convolved from 40.00\"" in h for h in history(res.mosaic))
    kept = make_mosaic(inputs, header, tmp_path / "n.fits", tmp_path / "nw.fits",
                       MosaicOptions(block=64, common_beam="none"))
    assert len(kept.warnings) == 1 and "B3" in kept.warnings[0] and "60.0\"" in kept.warnings[0], kept.warnings
    assert fits.getheader(kept.mosaic)["BMAJ"] * 3600 == pytest.approx(40.0)


def test_a_common_beam_smaller_than_an_input_is_a_one_line_error(two_beams, tmp_path):
    inputs, header, _ = two_beams
    with pytest.raises(HpcddfError) as err:
        make_mosaic(inputs, header, tmp_path / "m.fits", tmp_path / "w.fits", MosaicOptions(block=64, common_beam="30"))
    assert "\n" not in str(err.value) and "30" in str(err.value)
    assert not (tmp_path / "m.fits").exists()


# ---------------------------------------------------------------- 4. flux scale from the quality step

def _add_spectral_axes(path: str) -> None:
    """survey_sim writes 4-D data under a 2-axis WCS; PyBDSF wants DDFacet's FREQ and STOKES axes."""
    with fits.open(path, mode="update") as h:
        hd = h[0].header
        hd["CTYPE3"], hd["CRPIX3"], hd["CRVAL3"], hd["CDELT3"], hd["CUNIT3"] = "FREQ", 1.0, 144e6, 1e6, "Hz"
        hd["CTYPE4"], hd["CRPIX4"], hd["CRVAL4"], hd["CDELT4"] = "STOKES", 1.0, 1.0, 1.0


@pytest.fixture(scope="module")
def quality_field(tmp_path_factory):
    """A with all fluxes 1.2 x too high, B right; A's quality step (PyBDSF) run against the true
    sources as the "NVSS" catalogue."""
    from hpcddf.lofar.quality import Comparison, run_quality
    from hpcddf.mosaic.survey_sim import random_sources
    root = tmp_path_factory.mktemp("quality")
    sources = random_sources([A], 25, 0.3, (0.3, 1.0), seed=7, min_sep_deg=0.04)
    a = write(root, A, sources, seed=8, flux_scale=1.2)
    b = write(root, B, sources, seed=9)
    for path in (a.int_path, a.app_path):
        _add_spectral_axes(path)
    Table({"RA": [s.ra for s in sources], "DEC": [s.dec for s in sources],
           "Total_flux": [s.flux for s in sources]}).write(root / "nvss.fits")
    doc = run_quality(root / "A", [Comparison("NVSS", str(root / "nvss.fits"))])
    return a, b, sources, doc


def test_the_flux_scale_from_the_quality_step_corrects_the_field(quality_field, tmp_path):
    a, b, sources, doc = quality_field
    wd = Path(a.int_path).parent
    assert doc["catalogues"]["NVSS"]["used"] and doc["catalogues"]["NVSS"]["matches"] >= 20
    factor = quality_scale(wd, "A", "NVSS")
    assert factor == pytest.approx(1 / 1.2, rel=0.01)
    assert quality_scale(wd, "A", "any") == factor
    fixed = MosaicInput("A", a.int_path, a.app_path, scale=factor, scale_from="quality NVSS")
    header = mid_header()
    res, img, _, wcs = mosaic([fixed, b], header, tmp_path / "fixed")
    _, raw, _, _ = mosaic([a, b], header, tmp_path / "raw")
    radius = header["NAXIS1"] / 2 - 15
    checked, raw_ratio = [], []
    for s in sources:
        x, y = wcs.all_world2pix([[s.ra, s.dec]], 0)[0]
        if math.hypot(x - header["CRPIX1"] + 1, y - header["CRPIX2"] + 1) > radius:
            continue
        checked.append(aperture_flux(img, wcs, s) / s.flux - 1)
        raw_ratio.append(aperture_flux(raw, wcs, s) / s.flux)
    assert len(checked) >= 10
    assert max(abs(c) for c in checked) < 0.02, checked
    assert np.median(raw_ratio) > 1.15                       # the error was there to correct
    lines = history(res.mosaic)
    assert any(h.startswith("input A ") and f"scale {factor:g} (quality NVSS)" in h for h in lines), lines
    assert any(h.startswith("input B ") and "scale 1:" in h for h in lines), lines


# ---------------------------------------------------------------- 5. noise per facet

NOISY_FACET, QUIET_FACET = 3, 5      # east and west of the centre: the same primary beam


@pytest.fixture(scope="module")
def noisy_facet_field(tmp_path_factory):
    """A single field A whose facet 3 has beam-correlated noise of 2 x NOISE added (total
    sqrt(5) NOISE), in app and, divided by the primary beam, in int (app / int stays the beam)."""
    from scipy.ndimage import gaussian_filter
    root = tmp_path_factory.mktemp("facetnoise")
    a = write(root, A, [], seed=10)
    rng = np.random.default_rng(11)
    extra = gaussian_filter(rng.standard_normal((NPIX, NPIX)), RES / CELL / FWHM)
    extra *= 2 * NOISE / extra.std()
    yy, xx = np.mgrid[0:NPIX, 0:NPIX]
    side = NPIX // 3
    mine = (xx // side == NOISY_FACET % 3) & (yy // side == NOISY_FACET // 3)
    pb = primary_beam(A, field_wcs(A, SPEC), (NPIX, NPIX), PB)
    for path, add in ((a.app_path, extra), (a.int_path, extra / pb)):
        with fits.open(path, mode="update") as h:
            h[0].data[0, 0][mine] += add[mine].astype(np.float32)
    return a


def test_noise_per_facet_weights_each_facet_by_its_own_noise(noisy_facet_field, tmp_path):
    a = noisy_facet_field
    header = output_header("A", A.ra, A.dec, 0.8, CELL, RES)
    inp = corrected(a, CorrectionOptions(facet_noise=True))
    res, _, w, wcs = mosaic([inp], header, tmp_path / "facets")
    _, _, w_one, _ = mosaic([a], header, tmp_path / "one")
    [got] = [m for h in history(res.mosaic) if (m := re.search(r"A noise per facet (\S+?)-(\d\S*) Jy/beam", h))]
    lo, hi = (float(v) for v in got.groups())
    assert lo == pytest.approx(NOISE, rel=0.1)
    assert hi == pytest.approx(math.sqrt(5) * NOISE, rel=0.1)
    pb = primary_beam(A, wcs, w.shape, PB)

    def inv_var(weights: np.ndarray, facet: int) -> float:   # 1/sigma^2 = weight / beam^2
        sel = facet_interior(A, facet, wcs, w.shape) & (pb > 0.35)
        assert sel.sum() > 1000
        return float(np.median(weights[sel] / pb[sel] ** 2))
    noisy, quiet = (1 / math.sqrt(inv_var(w, f)) for f in (NOISY_FACET, QUIET_FACET))
    assert noisy == pytest.approx(hi, rel=0.03)          # the noisy facet is weighed by its own rms
    assert lo * 0.99 < quiet == pytest.approx(NOISE, rel=0.1)
    assert (quiet / noisy) ** 2 == pytest.approx(1 / 5, rel=0.15)   # the injected noise ratio, squared
    # one noise per field: every facet weighed alike
    assert inv_var(w_one, NOISY_FACET) == pytest.approx(inv_var(w_one, QUIET_FACET), rel=0.02)


# ---------------------------------------------------------------- 6. astromap

def test_astromap_blanks_where_the_positional_error_is_too_large(tmp_path):
    a = write(tmp_path / "f", A, [], seed=12)
    hdr = fits.getheader(a.app_path)
    w = WCS(hdr).celestial
    w2 = w.deepcopy()   # as hpcddf/lofar/offsets.py::astromap: 20x larger pixels
    w2.wcs.cdelt = w.wcs.cdelt * 20
    w2.wcs.crpix = (w.wcs.crpix - 0.5) / 20 + 0.5
    amap = np.full((NPIX // 20, NPIX // 20), 0.5, dtype=np.float32)
    amap[9:12, 4:7] = 5.0          # input pixels y 180-239, x 80-139: inside the beam
    amap[0, :] = np.nan            # outside every facet: never blanked
    fits.PrimaryHDU(amap, w2.to_header()).writeto(Path(a.int_path).parent / "astromap.fits")
    inp = corrected(a, CorrectionOptions(astromap_blank=2.0))
    header = output_header("A", A.ra, A.dec, 0.8, CELL, RES)
    res, img, wts, wcs = mosaic([inp], header, tmp_path / "amap")
    _, _, plain, _ = mosaic([a], header, tmp_path / "plain")
    x, y = in_field_pixels(A, wcs, wts.shape)
    inside = (x > 80 + 6) & (x < 139 - 6) & (y > 180 + 6) & (y < 239 - 6)
    near = (x > 80 - 12) & (x < 139 + 12) & (y > 180 - 12) & (y < 239 + 12)
    assert inside.sum() > 1000
    assert (wts[inside] == 0).all() and np.isnan(img[inside]).all()
    assert (plain[inside] > 0).all()
    assert np.allclose(wts[~near], plain[~near], rtol=1e-6)
    assert any("A astromap > 2\" blanked" in h for h in history(res.mosaic))


# ---------------------------------------------------------------- 7. errors

def test_missing_products_are_errors_naming_the_field_and_the_file(shifted, tmp_path):
    inputs, _, _ = shifted
    wd = tmp_path / "P042"
    wd.mkdir()
    shutil.copy(Path(inputs[0].int_path).parent / FULL.tessel, wd / FULL.tessel)
    with pytest.raises(CorrectionError, match=r"field P042 has no facet-offset\.txt"):
        field_corrections(wd, "P042", FULL.tessel, CorrectionOptions(apply_shifts=True))
    with pytest.raises(CorrectionError, match=r"field P042 has no astromap\.fits"):
        field_corrections(wd, "P042", FULL.tessel, CorrectionOptions(astromap_blank=1.0))
    with pytest.raises(CorrectionError, match="P042"):
        field_corrections(wd, "P042", FULL.tessel, CorrectionOptions(blank_bad_facets=True))
    with pytest.raises(CorrectionError, match=r"field P042 has no quality\.json"):
        quality_scale(wd, "P042", "NVSS")
    (wd / "quality").mkdir()
    entry = {"matches": 50, "flux_ratio": {"value": 1.2, "lo": 1.18, "hi": 1.22, "n": 50}}
    (wd / "quality" / "quality.json").write_text(json.dumps(
        {"catalogues": {"TGSS": {**entry, "used": False}, "NVSS": {**entry, "used": True},
                        "FIRST": {**entry, "used": True}}}))
    assert quality_scale(wd, "P042", "any") == pytest.approx(1 / 1.2)
    for unknown in ("VLSSr", "TGSS"):   # not there; there but not usable
        with pytest.raises(CorrectionError) as err:
            quality_scale(wd, "P042", unknown)
        msg = str(err.value)
        assert "P042" in msg and unknown in msg and "usable: NVSS, FIRST" in msg, msg


# ---------------------------------------------------------------- 8. workers

def test_corrected_mosaic_is_the_same_with_workers(shifted, tmp_path):
    inputs, _, _ = shifted
    opts = CorrectionOptions(apply_shifts=True, blank_bad_facets=True, facet_noise=True)
    corr = [corrected(i, opts) for i in inputs]
    assert corr[0].corrections.blanked == [0] and corr[1].corrections.blanked == [8]
    header = mid_header()
    one, img1, w1, _ = mosaic(corr, header, tmp_path / "one")
    two, img2, w2, _ = mosaic(corr, header, tmp_path / "two", MosaicOptions(block=64, workers=2))
    assert one.blocks_computed == two.blocks_computed and one.input_blocks == two.input_blocks
    assert np.array_equal(np.isnan(img1), np.isnan(img2))
    peak = np.nanmax(np.abs(img1))
    assert np.nanmax(np.abs(img1 - img2)) < 1e-6 * peak
    assert np.max(np.abs(w1 - w2)) < 1e-6 * w1.max()
