"""The mosaic maths on a synthetic survey: 7 fields on a hexagonal grid, SIN images with a
Gaussian primary beam, beam-correlated noise and point sources of known flux."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from hpcddf.mosaic.combine import (
    MosaicError,
    MosaicInput,
    MosaicOptions,
    beam_and_weight,
    make_mosaic,
    output_header,
)
from hpcddf.mosaic.pointings import neighbourhood
from hpcddf.mosaic.products import remove_islands
from hpcddf.mosaic.survey_sim import (
    FieldSpec,
    SkySource,
    hex_grid,
    random_sources,
    write_field,
)
from hpcddf.sky import SkyError, clipped_rms

SPEC = FieldSpec(cell_arcsec=10.0, resolution_arcsec=40.0, npix=324, pb_fwhm_deg=0.6, noise=5e-4)
SPACING = 0.4
BEAMCUT_RADIUS = SPEC.pb_fwhm_deg / 2 * math.sqrt(math.log(1 / 0.3) / math.log(2))


def build_survey(root: Path, sources: list[SkySource], scales: dict[str, float] | None = None,
                 noise: float = SPEC.noise) -> tuple[list, list[MosaicInput]]:
    pts = hex_grid(150.0, 50.0, SPACING, 1)
    spec = FieldSpec(SPEC.cell_arcsec, SPEC.resolution_arcsec, SPEC.npix, SPEC.pb_fwhm_deg, noise)
    inputs = []
    for i, p in enumerate(pts):
        ip, ap = write_field(root / p.id, p, spec, sources, "int.fits", "app.fits", seed=100 + i,
                             flux_scale=(scales or {}).get(p.id, 1.0))
        inputs.append(MosaicInput(p.id, str(ip), str(ap)))
    return pts, inputs


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("survey")
    pts = hex_grid(150.0, 50.0, SPACING, 1)
    sources = random_sources(pts[:1], 30, 0.22, (0.5, 1.0), seed=3, min_sep_deg=0.04)
    pts, inputs = build_survey(root, sources)
    nb = neighbourhood(pts[0], pts)
    header = output_header("P000", pts[0].ra, pts[0].dec, nb.max_separation, 10.0, 40.0)
    return root, pts, sources, inputs, header


def aperture_flux(image: np.ndarray, wcs: WCS, s: SkySource) -> float | None:
    """Integrated flux of a restored point source: aperture sum / beam area in pixels."""
    sig = 40.0 / 10.0 / (2 * math.sqrt(2 * math.log(2)))
    x, y = wcs.all_world2pix([[s.ra, s.dec]], 0)[0]
    xi, yi, r = int(round(x)), int(round(y)), 9
    if not (r <= xi < image.shape[1] - r and r <= yi < image.shape[0] - r):
        return None
    cut = image[yi - r:yi + r + 1, xi - r:xi + r + 1]
    if not np.isfinite(cut).all():
        return None
    yy, xx = np.mgrid[yi - r:yi + r + 1, xi - r:xi + r + 1]
    inside = (xx - x) ** 2 + (yy - y) ** 2 <= (2.2 * sig * 2.3548) ** 2
    return float(cut[inside].sum() / (2 * math.pi * sig ** 2))


def in_overlap(s: SkySource, pts) -> bool:
    """Whether at least two fields see the source above the beam cut."""
    from hpcddf.mosaic.pointings import Pointing, separations
    seps = separations(Pointing("s", s.ra, s.dec), pts)
    return sum(d < BEAMCUT_RADIUS * 0.95 for d in seps) >= 2


def test_fluxes_are_recovered_within_2_percent_where_fields_overlap(survey, tmp_path):
    root, pts, sources, inputs, header = survey
    res = make_mosaic(inputs, header, tmp_path / "m.fits", tmp_path / "w.fits", MosaicOptions(block=64))
    image = fits.getdata(tmp_path / "m.fits")
    wcs = WCS(fits.getheader(tmp_path / "m.fits"))
    checked = []
    for s in sources:
        if not in_overlap(s, pts):
            continue
        f = aperture_flux(image, wcs, s)
        if f is not None:
            checked.append(f / s.flux - 1)
    assert len(checked) >= 8, "the synthetic survey must put sources in overlaps"
    assert max(abs(c) for c in checked) < 0.02, checked
    assert set(res.noise) == {p.id for p in pts}
    assert all(n == pytest.approx(SPEC.noise, rel=0.1) for n in res.noise.values())


def test_noise_in_the_overlap_drops_as_the_weights_predict(tmp_path):
    pts, inputs = build_survey(tmp_path / "f", [])
    nb = neighbourhood(pts[0], pts)
    header = output_header("P000", pts[0].ra, pts[0].dec, nb.max_separation, 10.0, 40.0)
    make_mosaic(inputs, header, tmp_path / "m.fits", tmp_path / "w.fits", MosaicOptions(block=64))
    image = fits.getdata(tmp_path / "m.fits")
    wsum = fits.getdata(tmp_path / "w.fits")
    wcs = WCS(fits.getheader(tmp_path / "m.fits"))
    # halfway between the centre and its first neighbour: both beams ~0.46, so two equal weights
    mid_ra = (pts[0].ra + pts[1].ra) / 2
    x, y = (int(v) for v in wcs.all_world2pix([[mid_ra, (pts[0].dec + pts[1].dec) / 2]], 0)[0])
    box = (slice(y - 12, y + 13), slice(x - 12, x + 13))
    measured = float(np.nanstd(image[box]))
    predicted = float(np.median(1 / np.sqrt(wsum[box])))
    # by hand: every field whose beam B = exp(-d^2 / 2 s^2) is above the cut adds (B / noise)^2
    from hpcddf.mosaic.pointings import Pointing, separations
    sig = SPEC.pb_fwhm_deg / (2 * math.sqrt(2 * math.log(2)))
    mid = Pointing("mid", mid_ra, (pts[0].dec + pts[1].dec) / 2)
    beams = [math.exp(-d ** 2 / (2 * sig ** 2)) for d in separations(mid, pts)]
    by_hand = SPEC.noise / math.sqrt(sum(b * b for b in beams if b >= 0.3))
    best_single = SPEC.noise / max(beams)
    assert sum(b >= 0.3 for b in beams) == 4
    assert measured == pytest.approx(predicted, rel=0.15)
    assert predicted == pytest.approx(by_hand, rel=0.03)
    assert measured < 0.75 * best_single


def test_per_field_flux_scale_factors_correct_a_miscalibrated_field(tmp_path):
    pts = hex_grid(150.0, 50.0, SPACING, 1)
    src = [SkySource(pts[1].ra, pts[1].dec, 0.3)]  # at the centre of field P001
    _, inputs = build_survey(tmp_path / "f", src, scales={"P001": 1.25})
    nb = neighbourhood(pts[1], pts)
    header = output_header("P001", pts[1].ra, pts[1].dec, nb.max_separation, 10.0, 40.0)
    wrong = make_mosaic(inputs, header, tmp_path / "a.fits", tmp_path / "aw.fits", MosaicOptions(block=64))
    fixed = [MosaicInput(i.name, i.int_path, i.app_path, scale=0.8 if i.name == "P001" else 1.0)
             for i in inputs]
    make_mosaic(fixed, header, tmp_path / "b.fits", tmp_path / "bw.fits", MosaicOptions(block=64))
    wcs = WCS(header)
    f_wrong = aperture_flux(fits.getdata(wrong.mosaic), wcs, src[0])
    f_fixed = aperture_flux(fits.getdata(tmp_path / "b.fits"), wcs, src[0])
    assert f_wrong > 1.1 * 0.3
    assert f_fixed == pytest.approx(0.3, rel=0.02)


def test_workers_and_serial_agree_and_exact_is_close(survey, tmp_path):
    root, pts, sources, inputs, header = survey
    a = make_mosaic(inputs, header, tmp_path / "a.fits", tmp_path / "aw.fits", MosaicOptions(block=64))
    b = make_mosaic(inputs, header, tmp_path / "b.fits", tmp_path / "bw.fits",
                    MosaicOptions(block=64, workers=2))
    assert a.blocks_computed == b.blocks_computed and a.input_blocks == b.input_blocks
    ia, ib = fits.getdata(a.mosaic), fits.getdata(b.mosaic)
    assert np.array_equal(np.isnan(ia), np.isnan(ib))
    assert np.allclose(ia, ib, equal_nan=True, atol=1e-7)
    make_mosaic(inputs, header, tmp_path / "c.fits", tmp_path / "cw.fits",
                MosaicOptions(block=64, method="exact"))
    ic = fits.getdata(tmp_path / "c.fits")
    wcs = WCS(header)
    for s in sources[:10]:
        fa, fc = aperture_flux(ia, wcs, s), aperture_flux(ic, wcs, s)
        if fa is not None and fc is not None and in_overlap(s, pts):
            assert fc == pytest.approx(fa, rel=0.02)


def test_products_are_blanked_outside_the_circle_and_carry_their_headers(survey, tmp_path):
    root, pts, sources, inputs, header = survey
    res = make_mosaic(inputs, header, tmp_path / "m.fits", tmp_path / "w.fits", MosaicOptions(block=32))
    assert res.blocks_computed < res.blocks_total  # the corners are never computed
    with fits.open(res.mosaic) as h:
        data, head = h[0].data, h[0].header
    n = header["NAXIS1"]
    assert data.shape == (n, n) and data.dtype == np.dtype(">f4")
    assert np.isnan(data[0, 0]) and np.isnan(data[-1, -1]) and np.isfinite(data[n // 2, n // 2])
    assert head["BMAJ"] == pytest.approx(40 / 3600) and head["BUNIT"] == "JY/BEAM"
    assert head["ORIGIN"].startswith("hpcddf") and head["CTYPE1"] == "RA---SIN"
    history = " ".join(str(x) for x in head["HISTORY"])
    assert all(p.id in history for p in pts)
    w = fits.getdata(res.weights)
    assert w[n // 2, n // 2] == pytest.approx(1 / SPEC.noise ** 2, rel=0.15)  # centre: B=1
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_output_grid_follows_the_reference_sizes():
    h = output_header("P1", 200.0, 55.0, 2.58, 1.5, 6.0)
    himsize = int(2.58 / 2 * 1.15 / (1.5 / 3600))
    assert h["NAXIS1"] == h["NAXIS2"] == 2 * himsize and h["CRPIX1"] == himsize
    assert h["CDELT1"] == pytest.approx(-1.5 / 3600) and h["CDELT2"] == pytest.approx(1.5 / 3600)
    assert h["BMAJ"] == pytest.approx(6 / 3600) and h["LATPOLE"] == 55.0
    low = output_header("P1", 200.0, 55.0, 2.58, 4.5, 20.0)
    assert low["NAXIS1"] == 2 * int(2.58 / 2 * 1.15 / (4.5 / 3600))


def test_clipped_rms_ignores_sources_and_nans():
    rng = np.random.default_rng(0)
    data = rng.normal(0, 2e-4, (400, 400)).astype(np.float32)
    data[100:110, 100:110] = 5.0
    data[0:50, :] = np.nan
    assert clipped_rms(data, box=300) == pytest.approx(2e-4, rel=0.03)
    with pytest.raises(SkyError, match="no finite pixels"):
        clipped_rms(np.full((50, 50), np.nan), box=20)


def test_beam_is_the_filtered_ratio_cut_below_beamcut():
    beam = np.linspace(0.1, 1.0, 100, dtype=np.float32)[None, :].repeat(20, axis=0)
    sky = np.full_like(beam, 2.0)
    b, w = beam_and_weight(sky * beam, sky, 0.5, 0.3)
    inner = b[5:15, 5:95]
    assert np.allclose(inner[inner > 0], beam[5:15, 5:95][inner > 0], atol=0.01)
    assert (b[beam < 0.29] == 0).all() and (b[beam > 0.31] > 0).all()
    assert np.allclose(w, (b / 0.5) ** 2)


def test_islands_of_at_most_20_pixels_go_and_exact_zeros_stay():
    data = np.full((60, 60), np.nan, dtype=np.float32)
    data[5:45, 5:45] = 0.0          # a big region of exact zeros: data, not background
    data[50:54, 50:55] = 1.0        # a 20-pixel island: removed
    data[50:55, 2:7] = 1.0          # 25 pixels: kept
    assert remove_islands(data, 20) == 20
    assert (data[5:45, 5:45] == 0).all() and np.isnan(data[50:54, 50:55]).all()
    assert (data[50:55, 2:7] == 1).all()


def test_unreadable_inputs_are_clear_errors(survey, tmp_path):
    root, pts, sources, inputs, header = survey
    bad = [MosaicInput("X", str(tmp_path / "none.int.fits"), str(tmp_path / "none.app.fits"))]
    with pytest.raises(SkyError, match="cannot read image"):
        make_mosaic(bad, header, tmp_path / "m.fits", tmp_path / "w.fits")
    with pytest.raises(MosaicError, match="reprojection"):
        make_mosaic(inputs, header, tmp_path / "m.fits", tmp_path / "w.fits", MosaicOptions(method="nearest"))
    assert not (tmp_path / "m.fits").exists()
