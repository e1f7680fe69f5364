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


# ---------------------------------------------------------------- compact sources
#
# ddf-pipeline's utils/find_compact.py: isolated single-Gaussian sources train the distribution
# of ln(S_I/S_P) that an unresolved source has at each S/N, the whole catalogue the one that
# resolved sources add to it; where the whole catalogue's tail is five times heavier than the
# compact one's, a source is more likely resolved than not, and a smooth envelope in S/N through
# those points separates the two. Resolved sources have positions that need not coincide with
# the optical host, so they blur the offset histograms.

ENVELOPE_X0 = (0.7, 2.0, 105.0, 0.4)      # ddf-pipeline's start for [c0, c1, c2, c3]
ENVELOPE_FACTOR = 5.0                      # SF_full > 5 SF_compact marks the envelope
ENVELOPE_STEP = 0.01      # resolution of that point in ln(S_I/S_P)
ENVELOPE_COARSE = np.arange(0.0, 5.0, 5 * ENVELOPE_STEP)  # searched first, to ln 5 (a ratio of 150)
MIN_PER_BIN = 30        # compact sources per S/N bin below which a 4-parameter NIG fit is noise
MIN_ENVELOPE_BINS = 5   # envelope points needed to fit its 4 coefficients with one to spare


@dataclass(frozen=True)
class Envelope:
    """ln(S_I/S_P) above which a source counts as resolved, as a function of S_I/sigma_I:
    c3 + (c0 + c3) / (1 + (SNR / c2)^c1), fitted to one point per S/N bin (``snr``, ``points``).
    The form is ddf-pipeline's: c0 + 2 c3 is the faint limit and c3 the bright one (a
    reparametrisation of the usual c0 + c3 / c3, kept so that ddf-pipeline's start x0 applies).

    Reference quirk: ddf-pipeline extrapolates the fit beyond its faintest and brightest bins,
    where a shallow fit (small c1, large c0 and -c3, which noisy points allow) falls below zero
    and rejects bright point sources; fixed here by holding the envelope flat outside the S/N
    range of the bins (``snr``)."""

    coeffs: tuple[float, float, float, float]
    snr: np.ndarray
    points: np.ndarray

    def __call__(self, snr: np.ndarray) -> np.ndarray:
        clipped = np.clip(np.asarray(snr, float), self.snr.min(), self.snr.max())
        return envelope_model(clipped, self.coeffs)


@dataclass(frozen=True)
class CompactSelection:
    """Which sources the offsets use and how they were chosen: ``cuts`` are the isolation,
    S_Code, size and S/N cuts; ``keep`` is those less the sources above the envelope, or the
    cuts alone (``envelope`` None) for the ``reason`` given."""

    keep: np.ndarray
    cuts: np.ndarray
    envelope: Envelope | None
    reason: str = ""

    @property
    def method(self) -> str:
        return "envelope" if self.envelope is not None else "cuts only"


def envelope_model(snr: np.ndarray, c: Sequence[float]) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return c[3] + (c[0] + c[3]) / (1.0 + (snr / c[2]) ** c[1])


def snr_and_log_ratio(table: object) -> tuple[np.ndarray, np.ndarray]:
    """S_I/sigma_I and ln(S_I/S_P) of every source (NaN where a flux is not positive)."""
    t = table
    total = np.asarray(t["Total_flux"], float)  # type: ignore[index]
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = total / np.asarray(t["E_Total_flux"], float)  # type: ignore[index]
        ratio = np.log(total / np.asarray(t["Peak_flux"], float))  # type: ignore[index]
    return snr, ratio


def isolated_small_sources(table: object, bmaj_deg: float) -> np.ndarray:
    """ddf-pipeline's ``filter_sources``: no neighbour within max(15", 2.5 beams) (ddf-pipeline's
    15" is 2.5 of its 6" beams; scaled here as ``Geometry``), single-Gaussian (S_Code S), major
    axis no larger than twice the beam, S_I/sigma_I >= 3."""
    from scipy.spatial import cKDTree
    t = table
    ra, dec = np.asarray(t["RA"], float), np.asarray(t["DEC"], float)  # type: ignore[index]
    xyz = np.column_stack([np.cos(np.radians(dec)) * np.cos(np.radians(ra)),
                           np.cos(np.radians(dec)) * np.sin(np.radians(ra)), np.sin(np.radians(dec))])
    radius = np.radians(max(15.0 / 3600.0, 2.5 * bmaj_deg))
    n_near = np.array([len(x) for x in cKDTree(xyz).query_ball_point(xyz, r=radius)])
    code = np.char.strip(np.asarray(t["S_Code"]).astype(str))  # type: ignore[index]
    snr, _ = snr_and_log_ratio(t)
    return (n_near == 1) & (code == "S") & (np.asarray(t["Maj"], float) <= 2 * bmaj_deg) & (snr >= 3)  # type: ignore[index]


def snr_bin_edges(n_sources: int, snr_compact: np.ndarray) -> np.ndarray:
    """Equal-number bins in S/N of the compact sources; N/1000 of them for N sources in the
    whole catalogue, or N/500, or N/250 when that gives fewer than 10 (ddf-pipeline's rule)."""
    nbins = 0
    for per in (1000, 500, 250):
        nbins = n_sources // per
        if nbins >= 10:
            break
    if nbins < 1 or len(snr_compact) == 0:
        return np.zeros(0)
    return np.quantile(snr_compact, np.linspace(0.0, 1.0, nbins + 1))


def _bin_index(snr: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each S/N (-1 outside the edges). Reference quirk: ddf-pipeline tests
    edge < S/N < edge, which drops the faintest and brightest compact source from every fit;
    fixed here by closing the bins (each source still falls in exactly one)."""
    idx = np.searchsorted(edges[1:-1], snr, side="right")
    return np.where((snr >= edges[0]) & (snr <= edges[-1]), idx, -1)


def _fit_norminvgauss(values: np.ndarray) -> tuple[float, ...] | None:
    """Maximum-likelihood normal-inverse-Gaussian parameters, or None if the fit fails."""
    import warnings

    from scipy import stats
    values = values[np.isfinite(values)]
    if len(values) < MIN_PER_BIN:
        return None
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            params = tuple(float(p) for p in stats.norminvgauss.fit(values))
        except (ValueError, RuntimeError, FloatingPointError):
            return None
    return params if np.all(np.isfinite(params)) else None


def envelope_point(compact_values: np.ndarray, full_values: np.ndarray) -> float | None:
    """The first ln(S_I/S_P) >= 0 (on a 0.01 grid) where the whole catalogue's survival function
    exceeds five times the compact sources' (None if a fit fails or it never does).

    Reference quirk: ddf-pipeline searches the grid of a plotting histogram whose step
    (0.05-0.3) depends on how full its bins are, so the point moved by up to 0.3 with the source
    count; fixed here by a fixed 0.01 step. scipy computes this survival function by quadrature
    (about 1 ms a value), so a 0.05 grid is searched first, one unit of ln(S_I/S_P) at a time,
    and only the step before its first hit is refined (beyond the compact core the ratio of the
    two survival functions rises, so the first hit on the fine grid lies in that step)."""
    from scipy import stats
    pc, pf = _fit_norminvgauss(compact_values), _fit_norminvgauss(full_values)
    if pc is None or pf is None:
        return None

    def first_hit(x: np.ndarray) -> float | None:
        with np.errstate(all="ignore"):
            hit = np.flatnonzero(stats.norminvgauss.sf(x, *pf) > ENVELOPE_FACTOR * stats.norminvgauss.sf(x, *pc))
        return float(x[hit[0]]) if hit.size else None

    coarse = next((x for chunk in np.array_split(ENVELOPE_COARSE, 5) if (x := first_hit(chunk)) is not None), None)
    if coarse is None or coarse == 0.0:
        return coarse
    fine = first_hit(coarse - ENVELOPE_STEP * np.arange(4, -1, -1))  # its last value is the coarse hit
    return round(fine if fine is not None else coarse, 6)


def fit_envelope(snr: np.ndarray, points: np.ndarray) -> tuple[float, float, float, float] | None:
    """Least-squares envelope coefficients from ddf-pipeline's start, or None if the fit fails.

    Reference quirk: ddf-pipeline fits without bounds and ignores the fit's status. A negative
    c2 makes (SNR/c2)^c1 NaN, and c1 < 0 gives the same curves again (mirrored); unbounded,
    scipy's least_squares ran out of evaluations between the two branches on 2 of the first 3
    synthetic catalogues of the tests.
    Fixed here: c1 >= 0 and c2 > 0 (no curve is lost), steps scaled by the Jacobian, and a fit
    that did not converge or fits the points worse than their mean counts as failed."""
    from scipy.optimize import least_squares
    if len(snr) < MIN_ENVELOPE_BINS:
        return None
    lower = [-np.inf, 0.0, 1e-6, -np.inf]
    res = least_squares(lambda c: points - envelope_model(snr, c), ENVELOPE_X0, bounds=(lower, np.inf),
                        x_scale="jac", max_nfev=2000)
    coeffs = tuple(float(c) for c in res.x)
    resid = points - envelope_model(snr, coeffs)
    if res.status <= 0 or not np.all(np.isfinite(resid)) or np.std(resid) > np.std(points):
        return None
    return coeffs  # type: ignore[return-value]


def fit_compact_envelope(snr: np.ndarray, ratio: np.ndarray, cuts: np.ndarray) -> Envelope | str:
    """The envelope from the compact (``cuts``) and all sources, or the reason it cannot be fitted.

    Reference quirks fixed here: ddf-pipeline drops a bin without an envelope point by deleting
    one bin *edge*, which pairs every later point with the wrong S/N; and it places each point
    at the mean of its bin's edges, far above the sources of the last, widest bin. Here each
    point stays with its own bin and sits at the median S/N of that bin's compact sources."""
    ok = np.isfinite(snr) & np.isfinite(ratio)
    comp = cuts & ok
    edges = snr_bin_edges(int(ok.sum()), snr[comp])
    if len(edges) - 1 < MIN_ENVELOPE_BINS:
        return (f"{int(ok.sum())} sources give {max(len(edges) - 1, 0)} S/N bins "
                f"(an envelope needs {MIN_ENVELOPE_BINS}, i.e. >= {250 * MIN_ENVELOPE_BINS} sources)")
    b_comp, b_full = _bin_index(snr[comp], edges), _bin_index(snr[ok], edges)
    counts = np.bincount(b_comp[b_comp >= 0], minlength=len(edges) - 1)
    if counts.min() < MIN_PER_BIN:
        return f"{counts.min()} compact sources in an S/N bin (need {MIN_PER_BIN})"
    xs, ys = [], []
    for i in range(len(edges) - 1):
        point = envelope_point(ratio[comp][b_comp == i], ratio[ok][b_full == i])
        if point is not None:
            xs.append(float(np.median(snr[comp][b_comp == i])))
            ys.append(point)
    coeffs = fit_envelope(np.array(xs), np.array(ys))
    if coeffs is None:
        return f"the envelope fit failed ({len(xs)} of {len(edges) - 1} S/N bins had a point)"
    return Envelope(coeffs, np.array(xs), np.array(ys))


def compact_selection(table: object, bmaj_deg: float) -> CompactSelection:
    """Compact, isolated sources for the offsets: the isolation, S_Code, size and S/N cuts
    (``isolated_small_sources``), less those whose ln(S_I/S_P) lies above the envelope.

    ddf-pipeline keeps every catalogue source under the envelope, crowded and multi-Gaussian
    ones too; hpcddf keeps only those that also pass the cuts, since a blend's position is not
    its optical host's, so the envelope only ever removes sources from the cuts' selection.
    Without enough sources for a fit per S/N bin (a field of fewer than ~1250 sources, or
    fewer than 30 compact ones in a bin) or when a fit fails, the cuts alone decide.
    ddf-pipeline's radial correction of the peak fluxes (smearing) is not applied."""
    cuts = isolated_small_sources(table, bmaj_deg)
    snr, ratio = snr_and_log_ratio(table)
    env = fit_compact_envelope(snr, ratio, cuts)
    if isinstance(env, str):
        return CompactSelection(cuts, cuts, None, env)
    with np.errstate(invalid="ignore"):
        resolved = ratio > env(snr)
    return CompactSelection(cuts & ~resolved, cuts, env)


def compact(table: object, bmaj_deg: float) -> np.ndarray:
    """The sources the offsets use (``compact_selection``). How they were chosen is printed, as
    ``run_offsets`` prints its results: the offsets step runs as a tool whose stdout is the
    step's log, and no logging is configured there."""
    sel = compact_selection(table, bmaj_deg)
    if sel.envelope is not None:
        print(f"compact sources: {int(sel.keep.sum())} of the {int(sel.cuts.sum())} isolated small ones lie "
              f"under the ln(S_I/S_P) envelope (c0..c3 = {', '.join(f'{c:.3g}' for c in sel.envelope.coeffs)}, "
              f"{len(sel.envelope.snr)} S/N bins)")
    else:
        print(f"compact sources: {int(sel.keep.sum())}, by the isolation, S_Code, size and S/N cuts alone "
              f"(no envelope: {sel.reason})")
    return sel.keep


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
