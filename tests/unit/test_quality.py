"""Quality metrics on synthetic catalogues and images with known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.wcs import WCS

from hpcddf.lofar.quality import dynamic_range, flux_ratio, interval, position_offsets


def sky(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    ra = 150.0 + rng.uniform(-1.5, 1.5, n) / math.cos(math.radians(50.0))
    dec = 50.0 + rng.uniform(-1.5, 1.5, n)
    return rng, ra, dec


def test_interval_brackets_the_mean_like_its_standard_error():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, 400)
    est = interval(x)
    assert est.value == pytest.approx(x.mean()) and est.n == 400
    assert (est.hi - est.lo) / 2 == pytest.approx(x.std() / math.sqrt(400), rel=0.15)
    assert math.isnan(interval(np.array([1.0])).lo)


def test_mean_position_offsets_are_recovered_within_their_intervals():
    rng, ra, dec = sky()
    true = (1.0, -0.6)  # LOFAR minus catalogue, arcsec
    cat_ra = ra + rng.normal(0, 0.5, ra.size) / 3600 / np.cos(np.radians(dec))
    cat_dec = dec + rng.normal(0, 0.5, dec.size) / 3600
    lofar_ra = cat_ra + (true[0] + rng.normal(0, 0.7, ra.size)) / 3600 / np.cos(np.radians(dec))
    lofar_dec = cat_dec + (true[1] + rng.normal(0, 0.7, ra.size)) / 3600
    off = position_offsets(lofar_ra, lofar_dec, cat_ra, cat_dec)
    for key, t in zip(("dRA", "dDEC"), true):
        e = off[key]
        assert e.n > 350
        assert e.lo - 2 * (e.hi - e.lo) < t < e.hi + 2 * (e.hi - e.lo)
        assert e.value == pytest.approx(t, abs=0.1)


def test_flux_ratio_to_a_catalogue_in_mjy():
    rng, ra, dec = sky(seed=2)
    flux = np.exp(rng.uniform(np.log(0.01), np.log(2), ra.size))
    cat = flux / 0.9 * 1000 * (1 + rng.normal(0, 0.05, ra.size))   # LOFAR scale 0.9, mJy
    est = flux_ratio(ra, dec, flux, ra, dec, cat, fluxfactor=1000)
    assert est.value == pytest.approx(0.9, rel=0.01) and est.lo < 0.9 * 1.01 and est.hi > 0.9 * 0.99


def test_dynamic_range_is_peak_over_the_worst_nearby_artefact():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = [150.0, 50.0]
    w.wcs.crpix = [101, 101]
    w.wcs.cdelt = [-1.5 / 3600, 1.5 / 3600]
    img = np.random.default_rng(0).normal(0, 1e-4, (200, 200))
    img[100, 100] = 2.0          # the source (pixel 100, 100 is CRVAL)
    img[100, 118] = -0.01        # an artefact 27" away, outside the blanked core
    img[103, 100] = 0.5          # inside the blanked core: ignored
    est = dynamic_range(img, w, np.array([150.0]), np.array([50.0]), np.array([2.0]), 1.5)
    assert est.value == pytest.approx(200.0) and est.n == 1
    faint = dynamic_range(img, w, np.array([150.0]), np.array([50.0]), np.array([0.3]), 1.5)
    assert faint.n == 0


def test_comparison_catalogues_from_the_command_line_and_a_quality_parset(tmp_path):
    from hpcddf.errors import HpcddfError
    from hpcddf.lofar.quality import (
        Comparison,
        comparisons_from_parset,
        parse_comparison,
    )
    assert parse_comparison("FIRST=/c/first.fits") == Comparison("FIRST", "/c/first.fits", 10.0, 1.0)
    assert parse_comparison("TGSS=/c/tgss.fits:8:1000") == Comparison("TGSS", "/c/tgss.fits", 8.0, 1000.0)
    for bad in ("FIRST", "=x", "A=/p:-1", "A=/p:1:2:3", "A=/p:x"):
        with pytest.raises(HpcddfError, match="NAME=PATH"):
            parse_comparison(bad)
    cfg = tmp_path / "quality_pipeline.cfg"
    cfg.write_text("[comparison_cats]\nlist=['TGSS','FIRST']\nfilenames=['tgss.fits','first.fits']\n"
                   "radii=[10,10]\nfluxfactor=[1000,1000]\n")
    assert comparisons_from_parset(str(cfg)) == [Comparison("TGSS", "tgss.fits", 10.0, 1000.0),
                                                 Comparison("FIRST", "first.fits", 10.0, 1000.0)]
    cfg.write_text("[comparison_cats]\nlist=['TGSS','FIRST']\nfilenames=['tgss.fits']\n")
    with pytest.raises(HpcddfError, match="differ in length"):
        comparisons_from_parset(str(cfg))


def _power_law_sources(n_expected_per_deg2: float, area: float, alpha: float, smin: float, rng) -> np.ndarray:
    """Fluxes drawn from dN/dS proportional to S^-alpha above smin (Jy)."""
    n = rng.poisson(n_expected_per_deg2 * area)
    return smin * (1 - rng.uniform(size=n)) ** (-1.0 / (alpha - 1.0))


def test_source_counts_recover_a_flux_scale_error():
    from hpcddf.lofar.quality import (
        COUNT_INDEX_PRIOR,
        SQ_DEG_PER_SR,
        euclidean_counts_intema,
        source_counts,
    )
    rng = np.random.default_rng(2)
    alpha, area, smin = COUNT_INDEX_PRIOR[0], 30.0, 0.01
    # normalise so that S^2.5 dN/dS at 0.1 Jy equals Intema et al.'s: dN/dS = A S^-alpha per sr
    a_sr = euclidean_counts_intema(0.1) * 0.1 ** (alpha - 2.5)
    per_deg2 = a_sr / SQ_DEG_PER_SR * smin ** (1 - alpha) / (alpha - 1)
    flux = _power_law_sources(per_deg2, area, alpha, smin, rng)
    ok = source_counts(flux, rms_jy=smin / 20, area_deg2=area)
    assert ok["scale"] == pytest.approx(1.0, abs=0.05) and ok["index"] == pytest.approx(alpha, abs=0.03)
    low = source_counts(flux * 0.8, rms_jy=smin / 20 * 0.8, area_deg2=area)   # fluxes 20 % low
    assert low["scale"] == pytest.approx(1 / 0.8, rel=0.05)
    assert source_counts(flux[:5], rms_jy=smin / 20, area_deg2=area) is None


def test_status_reads_the_quality_summary_from_the_report_not_the_state(tmp_path):
    """Science writes products, never the engine's state: status takes the summary from
    quality/quality.json, and a field without one shows none."""
    import json

    from hpcddf.lofar.quality import QUALITY_DIR, status_of, summary_line
    assert status_of(tmp_path) == {}
    doc = {"image": "x.int.restored.fits", "n_sources": 3, "rms_jy": 0.01, "catalogues": {},
           "dynamic_range": {"value": 40.0, "lo": 35.0, "hi": 45.0, "n": 3}}
    (tmp_path / QUALITY_DIR).mkdir()
    (tmp_path / QUALITY_DIR / "quality.json").write_text(json.dumps(doc))
    got = status_of(tmp_path)["quality"]
    assert got["summary"] == summary_line(doc)
    assert got["report"] == str(tmp_path / QUALITY_DIR / "quality.txt")
    assert not (tmp_path / ".hpcddf").exists()
