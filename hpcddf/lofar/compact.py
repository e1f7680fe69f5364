"""Compact sources for the offsets step (hpcddf.lofar.offsets).

ddf-pipeline's utils/find_compact.py: isolated single-Gaussian sources train the distribution
of ln(S_I/S_P) that an unresolved source has at each S/N, the whole catalogue the one that
resolved sources add to it; where the whole catalogue's tail is five times heavier than the
compact one's, a source is more likely resolved than not, and a smooth envelope in S/N through
those points separates the two. Resolved sources have positions that need not coincide with
the optical host, so they blur the offset histograms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
