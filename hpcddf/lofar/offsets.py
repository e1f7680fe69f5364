"""Astrometric offsets per facet (after Smith et al. 2011, as ddf-pipeline's offsets step).

For every facet, every pair of a compact LOFAR source and a reference (optical) source within
``R`` = 60" gives a separation along each axis (arcsec; +RA is east, so dx = -(x_L - x_O) in
pixels). Histogrammed on 150 bins over [-40", 40"], each axis is modelled as

    mu(x) = bl * sqrt(R^2 - x^2) / R  +  norm * exp(-(x - offset)^2 / (2 sigma^2))

(chance pairs spread uniformly over the 60" disc, marginalised onto the axis, plus the true
matches) with a Poisson likelihood, flat priors norm >= 0, bl >= 0, 0 <= sigma <= 5",
|offset| <= 5", sampled with emcee (24 walkers, 1000 steps, 200 burn-in; walkers whose mean
lies outside the pooled 10-90 % range of any parameter are dropped), or fitted by least
squares (``fit=chi2``, errors 1 + sqrt(n + 0.75)).

Differences from ddf-pipeline's offsets.py, on purpose:
* the Poisson log-likelihood keeps ln Gamma(n + 1) (a constant, so the fit is unchanged);
* a facet with too few pairs gets offset 0 with error 100" (as theirs) and is flagged ``bad``;
  bad facets (true matches / their error < 2 on either axis) get the median offset of the good
  ones when the table is applied (ddf-pipeline meant to, but assigned to a copy);
* the pair radius, histogram range and priors scale with the restoring beam (``Geometry``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcddf.facets import Facet, facet_of, read_facet_coords, read_tessel
from hpcddf.facets import tangent as _tangent
from hpcddf.lofar.brightlist import OFFSETS_SRL
from hpcddf.lofar.compact import compact

R_ARCSEC = 60.0
BINS = np.linspace(-40.0, 40.0, 151)
CENTRES = 0.5 * (BINS[1:] + BINS[:-1])
MAX_OFFSET = 5.0
MAX_SIGMA = 5.0
REFERENCE_BEAM_ARCSEC = 6.0   # the resolution ddf-pipeline's numbers above are chosen for


@dataclass(frozen=True)
class Geometry:
    """The pair radius, histogram range and prior bounds, in arcsec. ddf-pipeline's are for a
    6" beam; hpcddf scales them with the restoring beam (``for_beam``) so that the method
    works at other resolutions too (at 6" and finer they are ddf-pipeline's exactly)."""

    scale: float = 1.0

    @classmethod
    def for_beam(cls, bmaj_arcsec: float) -> "Geometry":
        return cls(max(1.0, bmaj_arcsec / REFERENCE_BEAM_ARCSEC))

    @property
    def radius(self) -> float:
        return R_ARCSEC * self.scale

    @property
    def bins(self) -> np.ndarray:
        return BINS * self.scale

    @property
    def centres(self) -> np.ndarray:
        return CENTRES * self.scale

    @property
    def max_offset(self) -> float:
        return MAX_OFFSET * self.scale

    @property
    def max_sigma(self) -> float:
        return MAX_SIGMA * self.scale


LOFAR = Geometry()
MIN_PAIRS = 20


@dataclass(frozen=True)
class AxisFit:
    offset: float
    offset_err: float
    sigma: float
    norm: float          # peak height of the true-match Gaussian (counts per bin)
    norm_err: float
    bl: float
    matches: float = 0.0      # true matches under the Gaussian: norm sigma sqrt(2 pi) / bin width
    matches_err: float = 0.0

    @property
    def significant(self) -> bool:
        """The true-match peak is real: its number of matches is at least twice its error.
        (ddf-pipeline judged the peak height; when the matches scatter by less than a bin,
        height and width trade off and the height's error says nothing about the peak.)"""
        return self.matches_err > 0 and self.matches / self.matches_err >= 2.0


@dataclass(frozen=True)
class FacetOffset:
    facet: int
    n_sources: int
    ra: AxisFit
    dec: AxisFit

    @property
    def bad(self) -> bool:
        return not (self.ra.significant and self.dec.significant)


EMPTY = AxisFit(0.0, 100.0, 0.0, 0.0, 100.0, 0.0, 0.0, 100.0)


def pair_separations(lofar_xy: np.ndarray, ref_xy: np.ndarray, radius: float = R_ARCSEC) -> tuple[np.ndarray, np.ndarray]:
    """All (LOFAR, reference) pairs closer than ``radius``: (dx, dy) in arcsec, reference minus
    LOFAR in the sense that a positive dx means the LOFAR source lies west (+RA is east, and the
    tangent-plane x given here already increases to the east)."""
    from scipy.spatial import cKDTree
    if len(lofar_xy) == 0 or len(ref_xy) == 0:
        return np.zeros(0), np.zeros(0)
    tree = cKDTree(ref_xy)
    pairs = tree.query_ball_point(lofar_xy, r=radius)
    li = np.repeat(np.arange(len(lofar_xy)), [len(p) for p in pairs])
    ri = np.fromiter((j for p in pairs for j in p), dtype=int, count=len(li))
    d = ref_xy[ri] - lofar_xy[li]
    return d[:, 0], d[:, 1]


def model(x: np.ndarray, norm: float, sigma: float, offset: float, bl: float,
          radius: float = R_ARCSEC) -> np.ndarray:
    return (bl * np.sqrt(np.clip(radius ** 2 - x ** 2, 0.0, None)) / radius
            + norm * np.exp(-np.square(x - offset) / (2.0 * sigma ** 2)))


def log_prob(p: np.ndarray, counts: np.ndarray, geo: Geometry = LOFAR) -> np.ndarray:
    """Poisson ln posterior of parameter rows [norm, sigma, offset, bl] (vectorised)."""
    from scipy.special import gammaln
    p = np.atleast_2d(p)
    norm, sigma, offset, bl = p.T
    ok = ((norm >= 0) & (bl >= 0) & (sigma > 0) & (sigma <= geo.max_sigma)
          & (np.abs(offset) <= geo.max_offset))
    out = np.full(len(p), -np.inf)
    if ok.any():
        q = p[ok]
        mu = model(geo.centres[None, :], q[:, 0:1], q[:, 1:2], q[:, 2:3], q[:, 3:4], geo.radius)
        mu = np.maximum(mu, 1e-12)
        out[ok] = np.sum(counts * np.log(mu) - mu - gammaln(counts + 1.0), axis=1)
    return out


def _start(counts: np.ndarray, geo: Geometry = LOFAR) -> tuple[float, float, float]:
    height = float(np.median(counts))
    peak = float(geo.centres[int(np.argmax(counts))])
    if abs(peak) > 3.0 * geo.scale:
        peak = 0.0
    return max(float(counts.max()) - height, 0.1), peak, max(height, 0.1)


def fit_axis_mcmc(d: np.ndarray, seed: int = 0, nsteps: int = 1000, burn: int = 200,
                  geo: Geometry = LOFAR) -> AxisFit:
    import emcee
    counts, _ = np.histogram(d, bins=geo.bins)
    counts = counts.astype(float)
    norm0, peak0, height0 = _start(counts, geo)
    rng = np.random.default_rng(seed)
    nwalk = 24
    p0 = np.column_stack([np.abs(norm0 + rng.normal(0, 0.5, nwalk)), np.abs(0.5 * geo.scale + rng.normal(0, 0.05 * geo.scale, nwalk)),
                          peak0 + rng.normal(0, 0.1 * geo.scale, nwalk), np.abs(height0 + rng.normal(0, 2, nwalk))])
    sampler = emcee.EnsembleSampler(nwalk, 4, lambda p: log_prob(p, counts, geo), vectorize=True)
    sampler.random_state = np.random.RandomState(seed).get_state()
    sampler.run_mcmc(p0, nsteps, progress=False)
    chain = sampler.get_chain(discard=burn)              # (steps, walkers, 4)
    pooled = chain.reshape(-1, 4)
    lo, hi = np.percentile(pooled, [10, 90], axis=0)
    means = chain.mean(axis=0)                             # per walker
    keep = np.all((means >= lo) & (means <= hi), axis=1)   # drop lost walkers
    samples = chain[:, keep if keep.any() else slice(None)].reshape(-1, 4)
    est = samples.mean(axis=0)
    p16, p84 = np.percentile(samples, [16, 84], axis=0)
    err = (p84 - p16) / 2.0
    n = samples[:, 0] * samples[:, 1] * np.sqrt(2 * np.pi) / _bin_width(geo)
    n16, n84 = np.percentile(n, [16, 84])
    return AxisFit(float(est[2]), float(err[2]), float(est[1]), float(est[0]), float(err[0]), float(est[3]),
                   float(n.mean()), float((n84 - n16) / 2.0))


def _bin_width(geo: Geometry) -> float:
    return float(geo.bins[1] - geo.bins[0])


def fit_axis_chi2(d: np.ndarray, geo: Geometry = LOFAR) -> AxisFit:
    from scipy.optimize import curve_fit
    counts, _ = np.histogram(d, bins=geo.bins)
    norm0, peak0, height0 = _start(counts.astype(float), geo)
    try:
        p, cov = curve_fit(lambda x, n, s, o, b: model(x, n, s, o, b, geo.radius), geo.centres, counts,
                           p0=[norm0, geo.scale, peak0, height0], sigma=1.0 + np.sqrt(counts + 0.75),
                           bounds=([0, 1e-3 * geo.scale, -geo.max_offset, 0],
                                   [np.inf, geo.max_sigma, geo.max_offset, np.inf]))
    except RuntimeError:
        return EMPTY
    err = np.sqrt(np.clip(np.diag(cov), 0, None))
    n = p[0] * p[1] * np.sqrt(2 * np.pi) / _bin_width(geo)
    # first order, with the norm-sigma covariance (they trade off against each other)
    rel2 = (cov[0, 0] / p[0] ** 2 + cov[1, 1] / p[1] ** 2 + 2 * cov[0, 1] / (p[0] * p[1])) if p[0] > 0 else np.inf
    return AxisFit(float(p[2]), float(err[2]), float(p[1]), float(p[0]), float(err[0]), float(p[3]),
                   float(n), float(n * np.sqrt(max(rel2, 0.0))))


def fit_facets(lofar_xy: np.ndarray, lofar_facet: np.ndarray, ref_xy: np.ndarray,
               facets: Sequence[int], method: str = "mcmc", seed: int = 0,
               geo: Geometry = LOFAR) -> list[FacetOffset]:
    """Offsets (arcsec, reference minus LOFAR, east and north) of every facet."""
    out = []
    for k, f in enumerate(facets):
        mine = lofar_xy[lofar_facet == f]
        dx, dy = pair_separations(mine, ref_xy, geo.radius)
        if len(dx) < MIN_PAIRS:
            out.append(FacetOffset(int(f), len(mine), EMPTY, EMPTY))
            continue
        if method == "chi2":
            fx, fy = fit_axis_chi2(dx, geo), fit_axis_chi2(dy, geo)
        else:
            fx, fy = fit_axis_mcmc(dx, seed + 2 * k, geo=geo), fit_axis_mcmc(dy, seed + 2 * k + 1, geo=geo)
        out.append(FacetOffset(int(f), len(mine), fx, fy))
    return out


def applied_offsets(fits_: Sequence[FacetOffset]) -> dict[int, tuple[float, float]]:
    """The offsets to apply per facet: bad facets take the median of the good ones."""
    good = [f for f in fits_ if not f.bad]
    med = ((float(np.median([f.ra.offset for f in good])), float(np.median([f.dec.offset for f in good])))
           if good else (0.0, 0.0))
    return {f.facet: ((f.ra.offset, f.dec.offset) if not f.bad else med) for f in fits_}


# ---------------------------------------------------------------- DDFacet's facets (hpcddf.facets)

def facet_offset_text(coords: np.ndarray, facets: Sequence[Facet],
                      by_direction: dict[int, tuple[float, float]], cell_arcsec: float) -> str:
    """DDFacet's ``--Output-ShiftFacetsFile``: per facet ``ra_rad dec_rad dl dm`` in pixels, so
    that RestoreAndShift moves the facet by its direction's offset (arcsec east and north,
    reference minus LOFAR). DDFacet 0.9.1 moves a facet east by dl and north by -dm pixels:
    measured on its own output (tests/science/test_offsets_reduction.py)."""
    direction = {f.index: f.direction for f in facets}
    lines = []
    for i, (ra, dec) in enumerate(coords):
        dx, dy = by_direction.get(direction.get(i, -1), (0.0, 0.0))
        lines.append(f"{ra:.9f} {dec:.9f} {dx / cell_arcsec:.6f} {-dy / cell_arcsec:.6f}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the offsets step (node side)

RA_NAMES = ("ra", "raMean", "RA", "RAJ2000", "ra_deg")
DEC_NAMES = ("dec", "decMean", "DEC", "Dec", "DEJ2000", "dec_deg")
ASTROMAP_BLOCK = 20  # astromap.fits pixels are this many image pixels on a side


def _column(names: Sequence[str], colnames: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in colnames}
    return next((lower[n.lower()] for n in names if n.lower() in lower), None)


def reference_catalogue(cfg: object, workdir: Path | None = None, pending: Collection[str] = ()) -> str:
    """The reference catalogue of ``[offsets]``, checked before anything is queued: ``[offsets]
    catalogue``, else for ``method=panstarrs`` the one the login node downloaded into the field
    directory at submit (``panstarrs/panstarrs.fits``; relative: the step runs in the field
    directory). A path in ``pending`` is still to be downloaded (``--dry-run``): not read."""
    from hpcddf.errors import ConfigError
    from hpcddf.lofar.catalogues import PANSTARRS_MERGED, in_field
    method = cfg.get("offsets", "method")  # type: ignore[attr-defined]
    path = cfg.get("offsets", "catalogue")  # type: ignore[attr-defined]
    if not path and method == "panstarrs":
        path = str(in_field(workdir, PANSTARRS_MERGED))
    if not path:
        raise ConfigError(f"[offsets] method={method} needs a local reference catalogue",
                          "set [offsets] catalogue to a FITS/CSV file with RA and Dec columns "
                          "(hpcddf downloads only method=panstarrs, from the site's [catalogues] panstarrs_url)")
    where = in_field(workdir, path)
    if str(where) in pending:
        return str(path)
    if not where.is_file():
        raise ConfigError(f"offsets reference catalogue {path} does not exist",
                          "fix [offsets] catalogue ($$ is the site's catalogue dir)")
    read_reference(str(where))
    return str(path)


def read_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) degrees of a reference catalogue; a clear error if it has no such columns."""
    from astropy.table import Table

    from hpcddf.errors import ConfigError
    try:
        t = Table.read(path, format="ascii.csv") if str(path).endswith(".csv") else Table.read(path)
    except Exception as exc:
        raise ConfigError(f"offsets reference catalogue {path} cannot be read: {str(exc).splitlines()[0][:150]}",
                          "give a FITS table or a CSV file with a header line") from None
    ra, dec = _column(RA_NAMES, t.colnames), _column(DEC_NAMES, t.colnames)
    if ra is None or dec is None:
        raise ConfigError(f"offsets reference catalogue {path} has no RA/Dec columns (has {', '.join(t.colnames[:8])})",
                          "name them ra and dec (degrees)")
    return np.asarray(t[ra], float), np.asarray(t[dec], float)


def lofar_catalogue(root: str, out: str) -> object:
    """PyBDSF on ``<root>.int.restored.fits``, detecting on the apparent image (ddf-pipeline's
    offsets parameters: thresh 4/5, rms box (150,15), adaptive (60,15) above 150, no wavelets)."""
    import bdsf
    from astropy.table import Table

    from hpcddf.engine.atomic import atomic_path
    from hpcddf.sky import pybdsf_to_log
    int_ = f"{root}.int.restored.fits"
    if not Path(int_).is_file():
        int_ = f"{root}.app.restored.fits"  # no beam model (beam_model = None): DDF writes app only
    with pybdsf_to_log(Path(out).with_suffix(".pybdsf.log")):
        img = bdsf.process_image(int_, detection_image=f"{root}.app.restored.fits",
                                 thresh_isl=4.0, thresh_pix=5.0, rms_box=(150, 15), rms_map=True,
                                 mean_map="zero", adaptive_rms_box=True, adaptive_thresh=150.0,
                                 rms_box_bright=(60, 15), flag_maxsize_fwhm=0.5, frequency=144e6,
                                 quiet=True, output_opts=False)
        with atomic_path(out) as tmp:
            img.write_catalog(outfile=str(tmp), format="fits", catalog_type="srl", clobber=True)
    return Table.read(out)


def _sky_xy(wcs: object, ra: np.ndarray, dec: np.ndarray, cell_arcsec: float) -> np.ndarray:
    """Image-pixel positions scaled to arcsec, x increasing to the east (as ddf-pipeline)."""
    x, y = wcs.celestial.all_world2pix(ra, dec, 0)  # type: ignore[attr-defined]
    return np.column_stack([-x * cell_arcsec, y * cell_arcsec])


def offsets_table(fits_: Sequence[FacetOffset], out: str) -> None:
    """``<method>-facet_offsets.fits`` with ddf-pipeline's columns (one row per direction)."""
    from astropy.table import Table

    from hpcddf.engine.atomic import atomic_path
    t = Table({"Facet_id": [f.facet for f in fits_], "N_Sources": [f.n_sources for f in fits_],
               "RA_offset": [f.ra.offset for f in fits_], "DEC_offset": [f.dec.offset for f in fits_],
               "RA_error": [f.ra.offset_err for f in fits_], "DEC_error": [f.dec.offset_err for f in fits_],
               "RA_peak": [f.ra.norm for f in fits_], "DEC_peak": [f.dec.norm for f in fits_],
               "RA_peak_error": [f.ra.norm_err for f in fits_], "DEC_peak_error": [f.dec.norm_err for f in fits_],
               "RA_matches": [f.ra.matches for f in fits_], "DEC_matches": [f.dec.matches for f in fits_],
               "RA_matches_error": [f.ra.matches_err for f in fits_],
               "DEC_matches_error": [f.dec.matches_err for f in fits_],
               "Bad": [f.bad for f in fits_]})
    with atomic_path(out) as tmp:
        t.write(tmp, format="fits", overwrite=True)


def astromap(app_image: str, facets: Sequence[Facet], fits_: Sequence[FacetOffset],
             centre: tuple[float, float], out: str) -> None:
    """``astromap.fits``: the image grid with 20x larger pixels, each holding the positional
    error of its direction, sqrt(RA_error^2 + DEC_error^2) in arcsec (NaN outside the facets)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from hpcddf.engine.atomic import atomic_path
    hdr = fits.getheader(app_image)
    w = WCS(hdr).celestial
    ny, nx = int(hdr["NAXIS2"]) // ASTROMAP_BLOCK, int(hdr["NAXIS1"]) // ASTROMAP_BLOCK
    w2 = w.deepcopy()
    w2.wcs.cdelt = w.wcs.cdelt * ASTROMAP_BLOCK
    w2.wcs.crpix = (w.wcs.crpix - 0.5) / ASTROMAP_BLOCK + 0.5
    yy, xx = np.mgrid[0:ny, 0:nx]
    ra, dec = w2.all_pix2world(xx.ravel(), yy.ravel(), 0)
    direction = {f.index: f.direction for f in facets}
    err = {f.facet: float(np.hypot(f.ra.offset_err, f.dec.offset_err)) for f in fits_}
    idx = facet_of(ra, dec, facets, centre)
    vals = np.array([err.get(direction.get(int(i), -1), np.nan) if i >= 0 else np.nan for i in idx])
    with atomic_path(out) as tmp:
        fits.PrimaryHDU(vals.reshape(ny, nx).astype(np.float32), w2.to_header()).writeto(tmp, overwrite=True)


def quiver_plot(facets: Sequence[Facet], fits_: Sequence[FacetOffset], centre: tuple[float, float], out: str) -> None:
    """Each direction's offset as an arrow at its facets' mean position (bad ones grey)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcddf.engine.atomic import atomic_path
    fig, ax = plt.subplots(figsize=(6, 6))
    for fo in fits_:
        polys = [f.polygon for f in facets if f.direction == fo.facet]
        if not polys:
            continue
        xy = _tangent(np.concatenate(polys)[:, 0], np.concatenate(polys)[:, 1], centre).mean(axis=0)
        ax.quiver(xy[0], xy[1], fo.ra.offset, fo.dec.offset, angles="xy", scale_units="xy", scale=20.0,
                  color="grey" if fo.bad else "C0")
        ax.annotate(f"{fo.facet}: {fo.ra.offset:+.2f}\", {fo.dec.offset:+.2f}\"", xy, fontsize=7)
    ax.set(xlabel="east offset (deg)", ylabel="north offset (deg)", title="astrometric offsets per direction")
    ax.invert_xaxis()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_offsets(root: str, config: str, seed: int = 0) -> list[FacetOffset]:
    """The offsets step in the field directory: catalogue, compact sources, per-direction fits,
    and every output (table, facet-offset.txt, astromap.fits, quiver PNG)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from hpcddf.engine.atomic import write_text_atomic
    from hpcddf.lofar.config import load_config
    cfg = load_config([config])
    method, how = cfg.get("offsets", "method"), cfg.get("offsets", "fit")
    ref_ra, ref_dec = read_reference(reference_catalogue(cfg))
    app = f"{root}.app.restored.fits"
    hdr = fits.getheader(app)
    wcs, cell = WCS(hdr), abs(float(hdr["CDELT2"])) * 3600.0
    centre = (float(hdr["CRVAL1"]), float(hdr["CRVAL2"]))
    table = lofar_catalogue(root, f"{root}{OFFSETS_SRL}")
    keep = compact(table, float(hdr["BMAJ"]))
    ra, dec = np.asarray(table["RA"], float)[keep], np.asarray(table["DEC"], float)[keep]  # type: ignore[index]
    facets = read_tessel(f"{root}.tessel.reg", centre)
    direction = {f.index: f.direction for f in facets}
    lofar_dir = np.array([direction.get(int(i), -1) for i in facet_of(ra, dec, facets, centre)])
    dirs = sorted({f.direction for f in facets})
    geo = Geometry.for_beam(float(hdr["BMAJ"]) * 3600.0)
    fits_ = fit_facets(_sky_xy(wcs, ra, dec, cell), lofar_dir, _sky_xy(wcs, ref_ra, ref_dec, cell),
                       dirs, method=how, seed=seed, geo=geo)
    offsets_table(fits_, f"{method}-facet_offsets.fits")
    coords = read_facet_coords(f"{root}.facetCoord.txt")
    write_text_atomic("facet-offset.txt", facet_offset_text(coords, facets, applied_offsets(fits_), cell))
    astromap(app, facets, fits_, centre, "astromap.fits")
    quiver_plot(facets, fits_, centre, f"{method}-offsets.png")
    for f in fits_:
        print(f"direction {f.facet}: {f.n_sources} sources, RA {f.ra.offset:+.2f} +- {f.ra.offset_err:.2f}\", "
              f"Dec {f.dec.offset:+.2f} +- {f.dec.offset_err:.2f}\"" + (" (bad: median used)" if f.bad else ""))
    return fits_
