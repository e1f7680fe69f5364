"""Quality metrics of a final image (ddf-pipeline's quality pipeline): noise, dynamic range,
positional offsets and flux ratios against comparison catalogues, with bootstrap confidence
intervals. Catalogue inputs are arrays (RA, Dec in degrees, fluxes in Jy); running PyBDSF and
writing the report are the callers'.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from hpcddf.sky import isolated, pybdsf_to_log, unique_matches

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
                  cell_arcsec: float, beam_arcsec: float = 6.0, min_peak: float = 0.4) -> Estimate:
    """Median over bright isolated sources of peak / max |pixel| in a cutout of 10 beams with
    the central +-2.5 beams blanked (the brightest artefact near the source). At LoTSS's 6"
    beam and 1.5" cells that is ddf-pipeline's 60" cutout with +-10 pixels blanked."""
    box_arcsec = 10.0 * beam_arcsec
    blank_pix = int(round(2.5 * beam_arcsec / cell_arcsec))
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


# ---------------------------------------------------------------- the report of a reduced field

FINAL_ROOT = "image_full_ampphase_di_m.NS"
QUALITY_DIR = "quality"


@dataclass(frozen=True)
class Comparison:
    """A comparison catalogue (PyBDSM format): its crossmatch radius and flux unit factor."""

    name: str
    path: str
    radius_arcsec: float = 10.0
    fluxfactor: float = 1.0


def parse_comparison(text: str) -> Comparison:
    """``NAME=PATH[:RADIUS[:FLUXFACTOR]]`` (radius in arcsec; fluxfactor 1000 for mJy)."""
    from hpcddf.errors import HpcddfError
    name, sep, rest = text.partition("=")
    parts = rest.split(":")
    try:
        radius = float(parts[1]) if len(parts) > 1 else 10.0
        factor = float(parts[2]) if len(parts) > 2 else 1.0
    except ValueError:
        radius = factor = -1.0
    if not sep or not name or not parts[0] or radius <= 0 or factor <= 0 or len(parts) > 3:
        raise HpcddfError(f"comparison catalogue {text!r} is not NAME=PATH[:RADIUS[:FLUXFACTOR]]",
                          "e.g. --catalogue FIRST=/cats/first.fits:10 or TGSS=/cats/tgss.fits:10:1000")
    return Comparison(name, parts[0], radius, factor)


def comparisons_from_parset(path: str) -> list[Comparison]:
    """The ``[comparison_cats]`` of a ddf-pipeline quality parset (list, filenames, radii,
    fluxfactor as Python lists), unchanged."""
    import ast
    import configparser

    from hpcddf.errors import HpcddfError
    cp = configparser.ConfigParser()
    if not cp.read(path):
        raise HpcddfError(f"quality parset {path} cannot be read", "give the quality_pipeline.cfg path")
    if not cp.has_section("comparison_cats"):
        raise HpcddfError(f"quality parset {path} has no [comparison_cats]", "add list, filenames, radii")
    sec = cp["comparison_cats"]

    def get(key: str, default: Any) -> list[Any]:
        return list(ast.literal_eval(sec[key])) if key in sec else default
    names = get("list", [])
    files = get("filenames", [])
    radii = get("radii", [10.0] * len(names))
    factors = get("fluxfactor", [1.0] * len(names))
    if not names or not (len(names) == len(files) == len(radii) == len(factors)):
        raise HpcddfError(f"quality parset {path}: [comparison_cats] lists differ in length",
                          "give one filename, radius and fluxfactor per catalogue")
    return [Comparison(str(n), str(f), float(r), float(x)) for n, f, r, x in zip(names, files, radii, factors)]


def check_comparisons(comps: list[Comparison]) -> None:
    from hpcddf.lofar.bootstrap import check_catalogue
    for c in comps:
        check_catalogue(c.path)  # same format rule as the bootstrap's catalogues


def source_catalogue(int_image: str, app_image: str, out: str) -> Any:
    """PyBDSF on the beam-corrected image, detecting on the apparent one (quality pipeline's
    thresholds; no wavelet decomposition), written to ``out`` atomically."""

    import bdsf
    from astropy.io import fits
    from astropy.table import Table

    from hpcddf.engine.atomic import atomic_path
    freq = fits.getheader(app_image).get("RESTFRQ") or fits.getheader(app_image).get("CRVAL4") or 144e6
    with pybdsf_to_log(Path(out).with_suffix(".pybdsf.log")):
        img = bdsf.process_image(int_image, detection_image=app_image, thresh_isl=4.0, thresh_pix=5.0,
                                 rms_box=(160, 50), rms_map=True, mean_map="zero", adaptive_rms_box=True,
                                 adaptive_thresh=150, rms_box_bright=(60, 15), flag_maxsize_fwhm=0.5,
                                 frequency=float(freq), quiet=True, output_opts=False)
        with atomic_path(out) as tmp:
            img.write_catalog(outfile=str(tmp), format="fits", catalog_type="srl", clobber=True)
    return Table.read(out)


# Intema et al. (2017) 150 MHz Euclidean-normalised source counts: log10(S^2.5 dN/dS / Jy^1.5 sr^-1)
# as a polynomial in log10(S / Jy) (the coefficients ddf-pipeline's quality pipeline uses).
INTEMA_COEFFS = (3.5142, 0.3738, -0.3138, -0.0717, 0.0213, 0.0097)
COUNT_INDEX_PRIOR = (1.753, 0.01)   # alpha of dN/dS near 0.1 Jy: mean, width
SQ_DEG_PER_SR = 3282.8


def euclidean_counts_intema(s_jy: float) -> float:
    x = np.log10(s_jy)
    return float(10 ** sum(c * x ** i for i, c in enumerate(INTEMA_COEFFS)))


def _counts_log_prob(p: np.ndarray, h: np.ndarray, s: np.ndarray, ds: np.ndarray) -> np.ndarray:
    """Poisson ln L of binned counts under n(S) = 10^norm (S/0.1 Jy)^-alpha per Jy, with
    ln Gamma(h + 1) (the reference wrote ln Gamma(h), which is not the Poisson term) and the
    Gaussian prior on alpha with its 1/2 (the reference left it out, halving the width)."""
    from scipy.special import gammaln
    p = np.atleast_2d(p)
    norm, alpha = p[:, 0:1], p[:, 1:2]
    ok = ((norm >= 0) & (norm <= 5) & (alpha >= 0) & (alpha <= 4))[:, 0]
    mu = np.maximum(10 ** norm * ds * (s / 0.1) ** (-alpha), 1e-300)
    lp = np.sum(h * np.log(mu) - mu - gammaln(h + 1), axis=1)
    lp -= 0.5 * np.square((alpha[:, 0] - COUNT_INDEX_PRIOR[0]) / COUNT_INDEX_PRIOR[1])
    return np.where(ok, lp, -np.inf)


def source_counts(flux_jy: np.ndarray, rms_jy: float, area_deg2: float, seed: int = 0) -> dict[str, Any] | None:
    """Fit the differential source counts above 20 rms (19 log bins up to the first empty
    one) and the flux factor k that moves them onto Intema et al.'s at 0.1 Jy: scaling every
    flux by k multiplies n(S) by k^(alpha - 1), so k = (E_Intema / E_fit)^(1 / (alpha - 1)).
    (ddf-pipeline iterates towards the same point; the closed form needs no iteration.)
    None when fewer than 10 sources are above the cut."""
    import emcee
    s = np.asarray(flux_jy, float)
    s = s[np.isfinite(s) & (s > 20 * rms_jy)]
    if len(s) < 10 or area_deg2 <= 0:
        return None
    edges = np.logspace(np.log10(s.min()), np.log10(s.max()) + 1e-9, 20)
    h, _ = np.histogram(s, edges)
    empty = np.flatnonzero(h == 0)
    nb = int(empty[0]) if len(empty) else len(h)
    h, edges = h[:nb].astype(float), edges[:nb + 1]
    centres, widths = np.sqrt(edges[1:] * edges[:-1]), np.diff(edges)
    rng = np.random.default_rng(seed)
    start = np.log10(max(h[0] / widths[0] * (centres[0] / 0.1) ** COUNT_INDEX_PRIOR[0], 1.0))
    p0 = np.column_stack([np.clip(start + rng.normal(0, 0.05, 10), 0.01, 4.99),
                          COUNT_INDEX_PRIOR[0] + rng.normal(0, 0.005, 10)])
    sampler = emcee.EnsembleSampler(10, 2, lambda p: _counts_log_prob(p, h, centres, widths), vectorize=True)
    sampler.random_state = np.random.RandomState(seed).get_state()
    sampler.run_mcmc(p0, 1000, progress=False)
    norm, alpha = sampler.get_chain(discard=200, flat=True).mean(axis=0)
    omega = area_deg2 / SQ_DEG_PER_SR
    measured = 10 ** norm * 0.1 ** 2.5 / omega          # S^2.5 dN/dS at 0.1 Jy, per sr
    scale = (euclidean_counts_intema(0.1) / measured) ** (1.0 / (alpha - 1.0))
    return {"norm": float(norm), "index": float(alpha), "scale": float(scale), "n_sources": int(h.sum()),
            "area_deg2": float(area_deg2)}


def run_quality(workdir: Any, comps: list[Comparison], min_matches: int = 10,
                root: str = FINAL_ROOT) -> dict[str, Any]:
    """Catalogue the final image, compare it with each catalogue, write quality/quality.json,
    quality.txt and plots (``hpcddf status`` reads its summary from quality.json)."""
    from astropy.table import Table
    from astropy.wcs import WCS

    from hpcddf.engine.atomic import write_json_atomic, write_text_atomic
    from hpcddf.errors import HpcddfError
    from hpcddf.sky import clipped_rms, image_plane
    wd = Path(workdir)
    app = wd / f"{root}.app.restored.fits"
    int_ = wd / f"{root}.int.restored.fits"
    if not app.is_file():
        raise HpcddfError(f"{app} does not exist: the field has no final image yet",
                          f"see `hpcddf status {wd.name}`")
    if not int_.is_file():
        int_ = app  # no primary beam applied (e.g. beam_model = None): int is app
    out = wd / QUALITY_DIR
    out.mkdir(exist_ok=True)
    cat = source_catalogue(str(int_), str(app), str(out / f"{root}.cat.fits"))
    data, wcs, header = image_plane(str(int_))
    rms = clipped_rms(data, 1000)
    cell = abs(float(header.get("CDELT2", header.get("CDELT1", 1.5 / 3600)))) * 3600
    ra, dec = np.asarray(cat["RA"], float), np.asarray(cat["DEC"], float)
    beam = float(header.get("BMAJ", 6.0 / 3600)) * 3600
    dr = dynamic_range(np.asarray(data), WCS(header).celestial, ra, dec, np.asarray(cat["Peak_flux"], float),
                       cell, beam)
    area = float(np.isfinite(np.asarray(data)).sum()) * (cell / 3600) ** 2
    doc: dict[str, Any] = {"image": int_.name, "n_sources": len(cat), "rms_jy": rms,
                           "dynamic_range": dr.to_dict(), "catalogues": {},
                           "source_counts": source_counts(np.asarray(cat["Total_flux"], float), rms, area)}
    for c in comps:
        t = Table.read(c.path)
        off = position_offsets(ra, dec, t["RA"], t["DEC"], c.radius_arcsec)
        ratio = flux_ratio(ra, dec, np.asarray(cat["Total_flux"], float), t["RA"], t["DEC"],
                           t["Total_flux"], c.radius_arcsec, c.fluxfactor)
        entry = {"matches": ratio.n, "dRA_arcsec": off["dRA"].to_dict(), "dDEC_arcsec": off["dDEC"].to_dict(),
                 "flux_ratio": ratio.to_dict(), "used": ratio.n >= min_matches}
        doc["catalogues"][c.name] = entry
    write_json_atomic(out / "quality.json", doc)
    write_text_atomic(out / "quality.txt", report_text(wd.name, doc))
    _plots(out, doc)
    return doc


def report_text(field: str, doc: dict[str, Any]) -> str:
    dr = doc["dynamic_range"]
    lines = [f"quality of {field} ({doc['image']})",
             f"  sources found        {doc['n_sources']}",
             f"  central rms          {doc['rms_jy'] * 1e6:.1f} uJy/beam",
             f"  dynamic range        {dr['value']:.0f} (68 %: {dr['lo']:.0f}-{dr['hi']:.0f}, {dr['n']} sources)"]
    sc = doc.get("source_counts")
    lines.append(f"  source counts        index {sc['index']:.3f}, flux factor to Intema et al. {sc['scale']:.3f} "
                 f"({sc['n_sources']} sources)" if sc else "  source counts        too few sources above 20 rms")
    for name, c in doc["catalogues"].items():
        flag = "" if c["used"] else "  (too few matches: not used)"
        lines.append(f"  vs {name}: {c['matches']} matches{flag}")
        for key in ("dRA_arcsec", "dDEC_arcsec"):
            e = c[key]
            lines.append(f"    mean {key[:-7]:<4} {e['value']:+.2f}\" (68 %: {e['lo']:+.2f} to {e['hi']:+.2f})")
        f = c["flux_ratio"]
        lines.append(f"    flux ratio LOFAR/{name} {f['value']:.3f} (68 %: {f['lo']:.3f}-{f['hi']:.3f})")
    return "\n".join(lines) + "\n"


def summary_line(doc: dict[str, Any]) -> str:
    """One line for `hpcddf status`."""
    parts = [f"rms {doc['rms_jy'] * 1e6:.0f} uJy/b", f"DR {doc['dynamic_range']['value']:.0f}"]
    for name, c in doc["catalogues"].items():
        if c["used"]:
            parts.append(f"{name}: dRA {c['dRA_arcsec']['value']:+.2f}\" dDEC {c['dDEC_arcsec']['value']:+.2f}\" "
                         f"flux x{c['flux_ratio']['value']:.3f}")
    return ", ".join(parts)


def _plots(out: Any, doc: dict[str, Any]) -> None:
    """Offsets and flux ratios per catalogue, one PNG (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcddf.engine.atomic import atomic_path
    cats = list(doc["catalogues"].items())
    if not cats:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in cats:
        axes[0].errorbar(c["dRA_arcsec"]["value"], c["dDEC_arcsec"]["value"],
                         xerr=[[c["dRA_arcsec"]["value"] - c["dRA_arcsec"]["lo"]], [c["dRA_arcsec"]["hi"] - c["dRA_arcsec"]["value"]]],
                         yerr=[[c["dDEC_arcsec"]["value"] - c["dDEC_arcsec"]["lo"]], [c["dDEC_arcsec"]["hi"] - c["dDEC_arcsec"]["value"]]],
                         fmt="o", label=name)
        axes[1].errorbar([name], [c["flux_ratio"]["value"]],
                         yerr=[[c["flux_ratio"]["value"] - c["flux_ratio"]["lo"]], [c["flux_ratio"]["hi"] - c["flux_ratio"]["value"]]],
                         fmt="s")
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].axvline(0, color="grey", lw=0.5)
    axes[0].set_xlabel("mean dRA (arcsec)")
    axes[0].set_ylabel("mean dDEC (arcsec)")
    axes[0].legend()
    axes[1].axhline(1, color="grey", lw=0.5)
    axes[1].set_ylabel("median flux ratio LOFAR / catalogue")
    fig.tight_layout()
    with atomic_path(out / "quality.png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def status_of(workdir: Path) -> dict[str, Any]:
    """The field's quality summary for ``hpcddf status``, read from its report (``{}`` before
    the quality step has run)."""
    path = Path(workdir) / QUALITY_DIR / "quality.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        when = datetime.fromtimestamp(path.stat().st_mtime)
    except (OSError, ValueError):
        return {}
    return {"quality": {"summary": summary_line(doc), "time": when.astimezone().isoformat(timespec="seconds"),
                        "report": str(path.with_name("quality.txt"))}}
