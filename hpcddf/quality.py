"""Quality metrics of a final image (ddf-pipeline's quality pipeline): noise, dynamic range,
positional offsets and flux ratios against comparison catalogues, with bootstrap confidence
intervals. Catalogue inputs are arrays (RA, Dec in degrees, fluxes in Jy); running PyBDSF and
writing the report are the callers'.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hpcddf.bootstrap import isolated, unique_matches

CI = 0.68          # 16-84 % intervals
RESAMPLES = 10000


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float       # lower end of the 68 % interval
    hi: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def interval(values: np.ndarray, stat: Any = np.mean, seed: int = 0) -> Estimate:
    """The statistic and its 16-84 % bootstrap interval (scipy.stats.bootstrap, percentile)."""
    from scipy.stats import bootstrap
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 3:
        return Estimate(float(stat(v)) if len(v) else math.nan, math.nan, math.nan, len(v))
    res = bootstrap((v,), stat, confidence_level=CI, n_resamples=RESAMPLES, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    ci = res.confidence_interval
    return Estimate(float(stat(v)), float(ci.low), float(ci.high), len(v))


def matched(ra: np.ndarray, dec: np.ndarray, cat_ra: np.ndarray, cat_dec: np.ndarray,
            radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """(LOFAR indices, catalogue indices) of unique matches within the radius."""
    m = unique_matches(np.asarray(ra, float), np.asarray(dec, float), np.asarray(cat_ra, float),
                       np.asarray(cat_dec, float), radius_arcsec)
    li = np.flatnonzero(m >= 0)
    return li, m[li]


def position_offsets(ra: np.ndarray, dec: np.ndarray, cat_ra: np.ndarray, cat_dec: np.ndarray,
                     radius_arcsec: float = 10.0, isolation_arcsec: float = 30.0) -> dict[str, Estimate]:
    """Mean LOFAR - catalogue offsets (arcsec; dRA includes cos Dec) of isolated unique matches."""
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    keep = isolated(ra, dec, isolation_arcsec)
    li, ci = matched(ra[keep], dec[keep], cat_ra, cat_dec, radius_arcsec)
    r, d = ra[keep][li], dec[keep][li]
    cr, cd = np.asarray(cat_ra, float)[ci], np.asarray(cat_dec, float)[ci]
    dra = ((r - cr + 180.0) % 360.0 - 180.0) * np.cos(np.radians(d)) * 3600.0
    ddec = (d - cd) * 3600.0
    return {"dRA": interval(dra), "dDEC": interval(ddec)}


def flux_ratio(ra: np.ndarray, dec: np.ndarray, flux: np.ndarray, cat_ra: np.ndarray,
               cat_dec: np.ndarray, cat_flux: np.ndarray, radius_arcsec: float = 10.0,
               fluxfactor: float = 1.0, min_flux: float = 0.0) -> Estimate:
    """Median LOFAR / catalogue flux of unique matches (catalogue fluxes divided by
    ``fluxfactor``, e.g. 1000 for a catalogue in mJy)."""
    flux = np.asarray(flux, float)
    li, ci = matched(ra, dec, cat_ra, cat_dec, radius_arcsec)
    ok = flux[li] > min_flux
    ratios = flux[li][ok] / (np.asarray(cat_flux, float)[ci][ok] / fluxfactor)
    return interval(ratios, np.median)


def dynamic_range(image: np.ndarray, wcs: Any, ra: np.ndarray, dec: np.ndarray, peak: np.ndarray,
                  cell_arcsec: float, min_peak: float = 0.4, box_arcsec: float = 60.0,
                  blank_pix: int = 10) -> Estimate:
    """Median over bright isolated sources of peak / max |pixel| in a ``box_arcsec`` cutout with
    the central +-``blank_pix`` pixels blanked (the brightest artefact near the source)."""
    ra, dec, peak = (np.asarray(x, float) for x in (ra, dec, peak))
    sel = (peak > min_peak) & isolated(ra, dec, box_arcsec)
    half = int(round(box_arcsec / cell_arcsec / 2))
    values = []
    for r, d, p in zip(ra[sel], dec[sel], peak[sel]):
        x, y = (int(round(float(v))) for v in wcs.all_world2pix([[r, d]], 0)[0])
        if not (half <= x < image.shape[1] - half and half <= y < image.shape[0] - half):
            continue
        cut = np.array(image[y - half:y + half + 1, x - half:x + half + 1], dtype=float)
        cut[half - blank_pix:half + blank_pix + 1, half - blank_pix:half + blank_pix + 1] = np.nan
        worst = np.nanmax(np.abs(cut))
        if worst > 0:
            values.append(p / worst)
    return interval(np.array(values), np.median)
