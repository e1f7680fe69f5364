"""Per-facet astrometric offsets on synthetic catalogues with known truth: injected offsets and
a chance-match background are recovered within the fitted errors."""

from __future__ import annotations

import numpy as np
import pytest

from hpcddf.lofar.offsets import R_ARCSEC, applied_offsets, fit_facets, pair_separations

SHIFTS = {0: (1.2, -0.8), 1: (-0.5, 0.4), 2: (0.0, 1.5), 3: (2.0, 0.3)}  # LOFAR minus truth, arcsec


def synthetic(seed: int = 0, per_facet: int = 150, chance_per_disc: float = 25.0):
    """Four 1000" facets side by side; reference = true positions + a uniform background."""
    rng = np.random.default_rng(seed)
    lofar, facet, ref = [], [], []
    for f, (sx, sy) in SHIFTS.items():
        x0 = f * 1000.0
        true = np.column_stack([rng.uniform(x0, x0 + 1000, per_facet), rng.uniform(0, 1000, per_facet)])
        lofar.append(true + [sx, sy] + rng.normal(0, 1.0, true.shape))
        facet.append(np.full(per_facet, f))
        ref.append(true + rng.normal(0, 0.2, true.shape))
    density = chance_per_disc / (np.pi * R_ARCSEC ** 2)
    area = 4000.0 * 1000.0
    n_bg = rng.poisson(density * area)
    ref.append(np.column_stack([rng.uniform(0, 4000, n_bg), rng.uniform(0, 1000, n_bg)]))
    return np.concatenate(lofar), np.concatenate(facet), np.concatenate(ref)


def test_pairs_are_every_reference_source_within_the_radius():
    lofar = np.array([[0.0, 0.0]])
    ref = np.array([[10.0, 0.0], [0.0, -59.0], [61.0, 0.0], [42.0, 43.0]])
    dx, dy = pair_separations(lofar, ref)
    assert sorted(zip(dx.tolist(), dy.tolist())) == [(0.0, -59.0), (10.0, 0.0)]


@pytest.mark.parametrize("method", ["mcmc", "chi2"])
def test_injected_offsets_are_recovered_within_errors(method):
    lofar, facet, ref = synthetic(seed=1)
    fits_ = fit_facets(lofar, facet, ref, sorted(SHIFTS), method=method, seed=2)
    for f in fits_:
        sx, sy = SHIFTS[f.facet]
        # the fitted offset is reference minus LOFAR: the correction, minus the injected shift
        assert abs(f.ra.offset + sx) < 3 * f.ra.offset_err + 0.05, (f.facet, f.ra)
        assert abs(f.dec.offset + sy) < 3 * f.dec.offset_err + 0.05, (f.facet, f.dec)
        assert f.ra.offset_err < 0.3 and not f.bad
        assert f.ra.sigma == pytest.approx(1.02, abs=0.3)  # LOFAR 1" and reference 0.2" scatter


def test_a_facet_without_sources_is_flagged_and_takes_the_median_when_applied():
    lofar, facet, ref = synthetic(seed=3)
    fits_ = fit_facets(lofar, facet, ref, [0, 1, 2, 3, 7], method="chi2")
    empty = fits_[-1]
    assert empty.facet == 7 and empty.bad and empty.ra.offset_err == 100.0
    applied = applied_offsets(fits_)
    good = [f for f in fits_ if not f.bad]
    assert applied[7] == (pytest.approx(float(np.median([f.ra.offset for f in good]))),
                          pytest.approx(float(np.median([f.dec.offset for f in good]))))
    assert applied[0] == (fits_[0].ra.offset, fits_[0].dec.offset)


DDF = __import__("pathlib").Path(__file__).parent.parent / "data" / "ddf"


def test_ddfacet_facets_are_read_and_every_facet_centre_lies_in_its_own_facet():
    from hpcddf.lofar.offsets import facet_of, read_facet_coords, read_tessel
    facets = read_tessel(str(DDF / "image_full_ampphase_di_m.NS.tessel.reg"))
    assert [f.index for f in facets] == list(range(16))
    assert {f.direction for f in facets} == {0, 1, 2} and all(len(f.polygon) >= 3 for f in facets)
    coords = np.degrees(read_facet_coords(str(DDF / "image_full_ampphase_di_m.NS.facetCoord.txt")))
    assert coords.shape == (16, 2)
    assert facet_of(coords[:, 0], coords[:, 1], facets, (180.0, 60.0)).tolist() == list(range(16))
    assert facet_of(np.array([150.0]), np.array([10.0]), facets, (180.0, 60.0)).tolist() == [-1]


def test_the_shift_file_gives_each_facet_its_directions_offset_in_pixels():
    from hpcddf.lofar.offsets import facet_offset_text, read_facet_coords, read_tessel
    facets = read_tessel(str(DDF / "image_full_ampphase_di_m.NS.tessel.reg"))
    coords = read_facet_coords(str(DDF / "image_full_ampphase_di_m.NS.facetCoord.txt"))
    text = facet_offset_text(coords, facets, {0: (3.0, -1.5), 1: (0.0, 0.0), 2: (-6.0, 6.0)}, 1.5)
    rows = [line.split() for line in text.splitlines()]
    assert len(rows) == 16 and float(rows[0][0]) == pytest.approx(coords[0][0])
    by_dir = {f.index: f.direction for f in facets}
    for i, row in enumerate(rows):
        want = {0: (2.0, 1.0), 1: (0.0, 0.0), 2: (-4.0, -4.0)}[by_dir[i]]  # east = +dl, north = -dm
        assert (float(row[2]), float(row[3])) == pytest.approx(want)


def _cfg(tmp_path, *overrides):
    from hpcddf.lofar.config import load_config
    return load_config([], ["--offsets-method=pslocal", *overrides])


def test_the_reference_catalogue_is_checked_before_anything_is_queued(tmp_path):
    from astropy.table import Table

    from hpcddf.errors import ConfigError
    from hpcddf.lofar.offsets import read_reference, reference_catalogue
    with pytest.raises(ConfigError, match="needs a local reference catalogue"):
        reference_catalogue(_cfg(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        reference_catalogue(_cfg(tmp_path, f"--offsets-catalogue={tmp_path / 'nope.fits'}"))
    Table({"x": [1.0]}).write(tmp_path / "bad.fits")
    with pytest.raises(ConfigError, match="no RA/Dec columns"):
        reference_catalogue(_cfg(tmp_path, f"--offsets-catalogue={tmp_path / 'bad.fits'}"))
    (tmp_path / "ps.csv").write_text("raMean,decMean\n180.5,60.1\n")
    assert reference_catalogue(_cfg(tmp_path, f"--offsets-catalogue={tmp_path / 'ps.csv'}")).endswith("ps.csv")
    ra, dec = read_reference(str(tmp_path / "ps.csv"))
    assert ra.tolist() == [180.5] and dec.tolist() == [60.1]


def test_offsets_table_and_astromap_hold_each_directions_result(tmp_path):
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS

    from hpcddf.lofar.offsets import (
        EMPTY,
        AxisFit,
        FacetOffset,
        astromap,
        offsets_table,
        read_tessel,
    )
    facets = read_tessel(str(DDF / "image_full_ampphase_di_m.NS.tessel.reg"))
    dirs = sorted({f.direction for f in facets})
    fits_ = [FacetOffset(d, 30, AxisFit(0.5 * d, 0.1 * (d + 1), 1.0, 10.0, 1.0, 1.0, 20.0, 4.0),
                         AxisFit(-0.5, 0.2, 1.0, 10.0, 1.0, 1.0, 20.0, 4.0)) for d in dirs[:-1]]
    fits_.append(FacetOffset(dirs[-1], 0, EMPTY, EMPTY))
    offsets_table(fits_, str(tmp_path / "t.fits"))
    t = Table.read(tmp_path / "t.fits")
    assert list(t["Facet_id"]) == dirs and list(t["Bad"]) == [False] * (len(dirs) - 1) + [True]
    assert t["RA_offset"][1] == pytest.approx(0.5 * dirs[1])
    w = WCS(naxis=2)
    w.wcs.ctype, w.wcs.crval = ["RA---SIN", "DEC--SIN"], [180.0, 60.0]
    w.wcs.cdelt, w.wcs.crpix = [-20 / 3600, 20 / 3600], [301, 301]
    fits.PrimaryHDU(np.zeros((600, 600), np.float32), w.to_header()).writeto(tmp_path / "app.fits")
    astromap(str(tmp_path / "app.fits"), facets, fits_, (180.0, 60.0), str(tmp_path / "astromap.fits"))
    amap = fits.getdata(tmp_path / "astromap.fits")
    assert amap.shape == (30, 30)
    want = {float(np.float32(np.hypot(f.ra.offset_err, f.dec.offset_err))) for f in fits_}
    got = set(np.unique(amap[np.isfinite(amap)]).tolist())
    assert got and got <= want and len(got) >= 2


def test_the_histogram_geometry_scales_with_the_beam_so_coarse_images_work():
    """A 120" image: positions scatter by arcsec and the shift is tens of arcsec, beyond the
    6"-beam geometry's 5" prior; the beam-scaled geometry recovers it."""
    from hpcddf.lofar.offsets import LOFAR, Geometry
    geo = Geometry.for_beam(120.0)
    assert geo.scale == 20.0 and geo.radius == 1200.0 and geo.max_offset == 100.0
    assert Geometry.for_beam(6.0) == LOFAR and Geometry.for_beam(4.0) == LOFAR
    rng = np.random.default_rng(5)
    n, shift = 40, np.array([30.0, -20.0])
    lofar = rng.uniform(-20000, 20000, (n, 2))
    ref = np.vstack([lofar + shift + rng.normal(0, 2.0, (n, 2)),
                     rng.uniform(-21000, 21000, (800, 2))])
    [fit] = fit_facets(lofar, np.zeros(n, int), ref, [0], method="mcmc", geo=geo)
    assert not fit.bad
    assert fit.ra.offset == pytest.approx(shift[0], abs=max(3 * fit.ra.offset_err, 2.0))
    assert fit.dec.offset == pytest.approx(shift[1], abs=max(3 * fit.dec.offset_err, 2.0))
    [narrow] = fit_facets(lofar, np.zeros(n, int), ref, [0], method="mcmc")  # ddf-pipeline's numbers
    assert abs(narrow.ra.offset - shift[0]) > 10  # its prior cannot reach 30"


# ---------------------------------------------------------------- compact sources: the envelope

BMAJ = 6.0 / 3600.0
POINT, RESOLVED, EXTENDED = 0, 1, 2


def source_catalogue(seed: int = 0, n_point: int = 2600, n_resolved: int = 150, n_extended: int = 1250):
    """A PyBDSF-like catalogue over 3 deg x 3 deg (so almost every source is isolated) with known
    kinds: point sources, whose ln(S_I/S_P) scatters about 0 by 0.03 + 1.2/SNR; marginally
    resolved ones (1.3-1.9 beams, S_Code S: they pass the isolation, S_Code and size cuts);
    and extended ones (2.2-5 beams or multi-Gaussian: the cuts remove them, but they are the
    whole catalogue's tail). A resolved source's ln(S_I/S_P) is 2 ln(size / beam) plus noise."""
    from astropy.table import Table
    rng = np.random.default_rng(seed)
    kind = np.repeat([POINT, RESOLVED, EXTENDED], [n_point, n_resolved, n_extended])
    n = len(kind)
    snr = 3.0 / rng.uniform(0.003, 1.0, n)  # N(>S) ~ 1/S from S/N 3 to 1000
    size = np.ones(n)
    size[kind == RESOLVED] = rng.uniform(1.3, 1.9, n_resolved)
    size[kind == EXTENDED] = rng.uniform(2.2, 5.0, n_extended)
    ln_ratio = 2 * np.log(size) + rng.normal(0.0, 0.03 + 1.2 / snr)
    code = np.where((kind == EXTENDED) & (rng.uniform(size=n) < 0.5), "M", "S")
    rms = 1e-4
    dec = 50.0 + rng.uniform(-1.5, 1.5, n)
    ra = 180.0 + rng.uniform(-1.5, 1.5, n) / np.cos(np.radians(dec))
    table = Table({"RA": ra, "DEC": dec, "S_Code": code, "Maj": size * BMAJ * rng.uniform(0.95, 1.05, n),
                   "Total_flux": snr * rms, "E_Total_flux": np.full(n, rms),
                   "Peak_flux": snr * rms / np.exp(ln_ratio), "Isl_rms": np.full(n, rms)})
    return table, kind


@pytest.fixture(scope="module")
def envelope_field():
    from hpcddf.lofar.compact import compact_selection
    table, kind = source_catalogue(seed=1)
    return table, kind, compact_selection(table, BMAJ)


def test_the_envelope_rejects_resolved_sources_and_keeps_point_sources(envelope_field):
    from hpcddf.lofar.compact import snr_and_log_ratio
    table, kind, sel = envelope_field
    assert sel.method == "envelope" and sel.reason == ""
    assert len(sel.envelope.snr) == 16  # 4000 sources: N/250 bins, every one with a point
    # the cuts alone keep nearly all marginally resolved sources: the envelope does the work
    assert sel.cuts[kind == RESOLVED].mean() > 0.95
    kept = sel.keep[sel.cuts]
    by_kind = {k: kept[kind[sel.cuts] == k].mean() for k in (POINT, RESOLVED)}
    assert by_kind[POINT] > 0.97           # measured 0.984
    assert by_kind[RESOLVED] < 0.25        # measured 0.14
    assert not sel.keep[kind == EXTENDED].any()
    snr, ratio = snr_and_log_ratio(table)
    above = ratio > sel.envelope(snr)
    assert above[kind == EXTENDED].mean() > 0.95  # the envelope alone would reject them too
    assert not (sel.keep & above).any() and not (sel.keep & ~sel.cuts).any()


def test_the_envelope_narrows_with_snr_and_is_flat_beyond_its_bins(envelope_field):
    _, _, sel = envelope_field
    env = sel.envelope
    lo, hi = env.snr.min(), env.snr.max()
    assert 3.0 <= lo < 4.0 and hi > 50.0
    faint, bright = env(np.array([lo, hi]))
    assert 0.5 < faint < 1.0 and 0.05 < bright < 0.4 and faint > bright + 0.3
    # ddf-pipeline extrapolates the fit; here it is held at the edge of the bins
    assert env(np.array([1e6, 0.5])) == pytest.approx([bright, faint])
    assert np.sqrt(np.mean((env(env.snr) - env.points) ** 2)) < 0.15


def test_compact_says_how_it_chose_and_returns_the_selection(envelope_field, capsys):
    from hpcddf.lofar.compact import compact
    table, _, sel = envelope_field
    assert (compact(table, BMAJ) == sel.keep).all()
    out = capsys.readouterr().out
    assert f"{int(sel.keep.sum())} of the {int(sel.cuts.sum())} isolated small ones" in out
    assert "envelope (c0..c3 =" in out


def test_a_small_field_falls_back_to_the_cuts(capsys):
    """~30 sources, as the simulated field of the science test: no envelope, the cuts alone."""
    from hpcddf.lofar.compact import compact, compact_selection, isolated_small_sources
    table, kind = source_catalogue(seed=2, n_point=26, n_resolved=2, n_extended=4)
    sel = compact_selection(table, BMAJ)
    assert sel.method == "cuts only" and sel.envelope is None
    assert "32 sources give 0 S/N bins" in sel.reason
    assert (sel.keep == isolated_small_sources(table, BMAJ)).all()
    assert sel.keep[kind == POINT].all() and not sel.keep[kind == EXTENDED].any()
    assert (compact(table, BMAJ) == sel.keep).all()
    assert "by the isolation, S_Code, size and S/N cuts alone (no envelope: 32 sources" in capsys.readouterr().out


def test_too_few_compact_sources_per_bin_fall_back_to_the_cuts():
    """Enough sources for bins (2000: 8 of them), but mostly extended: 20 compact ones a bin."""
    from hpcddf.lofar.compact import compact_selection
    table, _ = source_catalogue(seed=3, n_point=150, n_resolved=10, n_extended=1840)
    sel = compact_selection(table, BMAJ)
    assert sel.envelope is None and "compact sources in an S/N bin (need 30)" in sel.reason
    assert (sel.keep == sel.cuts).all()


@pytest.mark.parametrize("n, bins", [(25000, 25), (9999, 19), (4999, 19), (2600, 10), (1249, 4), (200, 0)])
def test_snr_bins_follow_ddf_pipelines_rule(n, bins):
    """N/1000 bins, else N/500, else N/250 when the first gives fewer than 10."""
    from hpcddf.lofar.compact import snr_bin_edges
    edges = snr_bin_edges(n, np.arange(1.0, 301.0))
    assert max(len(edges) - 1, 0) == bins


def test_bins_hold_their_faintest_and_brightest_source():
    """ddf-pipeline's open bins (edge < S/N < edge) dropped the extremes; each source is in one bin."""
    from hpcddf.lofar.compact import _bin_index, snr_bin_edges
    snr = np.random.default_rng(4).uniform(3, 300, 500)
    idx = _bin_index(snr, snr_bin_edges(2500, snr))
    assert idx.min() == 0 and idx.max() == 9 and np.bincount(idx).tolist() == [50] * 10
    assert _bin_index(np.array([1.0, 400.0]), snr_bin_edges(2500, snr)).tolist() == [-1, -1]


def test_the_envelope_fit_recovers_a_known_curve():
    from hpcddf.lofar.compact import envelope_model, fit_envelope
    snr = np.geomspace(3, 300, 12)
    truth = (0.2, 1.5, 10.0, 0.15)
    coeffs = fit_envelope(snr, envelope_model(snr, truth))
    assert coeffs is not None
    assert envelope_model(snr, coeffs) == pytest.approx(envelope_model(snr, truth), abs=1e-3)
    assert fit_envelope(snr[:4], envelope_model(snr[:4], truth)) is None  # 4 points, 4 coefficients


def test_the_envelope_point_is_where_the_full_tail_is_five_times_the_compact_one():
    """Compact: N(0, 0.1); full: 70 % of those plus 30 % spread over ln(S_I/S_P) 0.3-2. The
    compact survival function at 0.2 (2 sigma) is 0.023, the full one > 0.3: the point lies
    between 1 and 2 sigma, on the 0.01 grid."""
    from hpcddf.lofar.compact import envelope_point
    rng = np.random.default_rng(6)
    comp = rng.normal(0.0, 0.1, 700)
    full = np.concatenate([rng.normal(0.0, 0.1, 700), rng.uniform(0.3, 2.0, 300)])
    x = envelope_point(comp, full)
    assert x is not None and 0.1 <= x <= 0.2 and round(x * 100) == pytest.approx(x * 100, abs=1e-6)
    # same population: only where both fitted tails are extrapolated (beyond 3 sigma) may they differ
    same = envelope_point(comp, rng.normal(0.0, 0.1, 700))
    assert same is None or same > 0.3
    assert envelope_point(comp[:20], full) is None                  # too few for a fit
