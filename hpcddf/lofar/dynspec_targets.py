"""The directions of the dynamic spectra (``hpcddf.lofar.dynspec``): targets from a FITS
catalogue and a CSV source list, and "off" positions that sample the residual noise.

* Targets: FITS rows (DESIGNATION, ra, dec, pmra, pmdec, ref_epoch, parallax, Type; degrees,
  mas/yr, Julian years, mas), moved by their proper motion to the start of the observation
  when pmra is known, and ``--srclist`` rows (``Name,ra,dec,Type``, degrees; a header line
  is skipped), both kept only within ``--rad`` degrees of the phase centre.
* Off positions with a DDFacet ``.DicoFacet`` (a pickled dict: facet id -> {"Polygon": the
  facet's (l, m) vertices in radians about the image centre, "iSol": its solution direction,
  ...}): every facet that meets the ``--rad`` circle gets max(nMinOffPerFacet, noff // facets)
  points drawn uniformly in its bounding box, each kept when a 10" circle about it lies at
  least 95 % inside the facet. Without one: ``noff`` points uniform on the sky within ``rad``.
  Off positions are not checked against sources (the model is subtracted: they sample the
  residuals, as DynSpecMS's do).
* Every direction is tagged with the facet that overlaps most with a 0.001 deg circle about it,
  and that facet's solution direction ("tessel").

Areas of overlap are measured by counting a fixed equal-area pattern of points of the circle
that fall inside the facet (matplotlib's point-in-polygon): Polygon3, which DynSpecMS uses,
aborts the interpreter at exit under this Python.
"""

from __future__ import annotations

import csv
import math
import pickle
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hpcddf.errors import HpcddfError

OFF_CLEAR_ARCSEC = 10.0  # the circle an off position must have (mostly) inside its facet
OFF_INSIDE_FRACTION = 0.95
TAG_RADIUS_DEG = 0.001
CATALOGUE_COLUMNS = ("DESIGNATION", "ra", "dec", "pmra", "pmdec", "ref_epoch", "parallax", "Type")
_DISC_POINTS = 256  # points of the equal-area pattern that measures overlaps
_MAX_DRAWS = 200  # candidate batches per facet before giving up on a sliver


class TargetError(HpcddfError):
    """A catalogue, source list or facet file that cannot be used (the message says why)."""


@dataclass(frozen=True)
class Direction:
    """One stacked direction (radians)."""

    name: str
    ra: float
    dec: float
    type: str
    kind: str  # "TARGET" or "OFF": the output directory
    facet: int = -1
    tessel: int = -1


# ------------------------------------------------------------------------------ geometry


def radec_to_lm(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Direction cosines about (ra0, dec0): l to the east, m to the north (the MS convention)."""
    from astropy.coordinates import SkyCoord, SkyOffsetFrame
    c = SkyCoord(np.atleast_1d(ra), np.atleast_1d(dec), unit="rad")
    xyz = c.transform_to(SkyOffsetFrame(origin=SkyCoord(ra0, dec0, unit="rad"))).cartesian
    return np.asarray(xyz.y.value), np.asarray(xyz.z.value)


def lm_to_radec(l: np.ndarray, m: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of radec_to_lm (n = sqrt(1 - l^2 - m^2), the front hemisphere)."""
    from astropy.coordinates import CartesianRepresentation, SkyCoord, SkyOffsetFrame
    l, m = np.atleast_1d(l), np.atleast_1d(m)
    frame = SkyOffsetFrame(origin=SkyCoord(ra0, dec0, unit="rad"))
    rep = CartesianRepresentation(np.sqrt(np.clip(1 - l**2 - m**2, 0, None)), l, m)
    c = SkyCoord(frame.realize_frame(rep)).icrs
    return np.asarray(c.ra.rad), np.asarray(c.dec.rad)


def _disc_pattern() -> np.ndarray:
    """Equal-area points of the unit disc (a sunflower pattern), shape (n, 2)."""
    k = np.arange(_DISC_POINTS) + 0.5
    r, phi = np.sqrt(k / _DISC_POINTS), k * math.pi * (3 - math.sqrt(5))
    return np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)


def inside_fraction(poly: np.ndarray, lm: np.ndarray, radius: float) -> np.ndarray:
    """For circles of ``radius`` about each (l, m) of ``lm`` (n, 2): the fraction inside ``poly``."""
    from matplotlib.path import Path as MplPath
    pts = lm[:, None, :] + radius * _disc_pattern()[None]
    inside = MplPath(poly).contains_points(pts.reshape(-1, 2))
    return inside.reshape(len(lm), -1).mean(axis=1)


# ------------------------------------------------------------------------------ targets


def _float(x: object) -> float:
    if x is np.ma.masked:
        return math.nan
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _moved(ra: float, dec: float, pmra: float, pmdec: float, epoch: float, parallax: float,
           obs_mjd: float) -> tuple[float, float]:
    """The position at the observation, moved by its proper motion (and parallax distance)."""
    import astropy.units as u
    from astropy.coordinates import Distance, SkyCoord
    from astropy.time import Time
    dist = Distance(parallax=parallax * u.mas) if parallax > 0 else None
    c = SkyCoord(ra * u.deg, dec * u.deg, distance=dist, pm_ra_cosdec=pmra * u.mas / u.yr,
                 pm_dec=(0.0 if math.isnan(pmdec) else pmdec) * u.mas / u.yr,
                 obstime=Time(epoch, format="jyear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ERFA: "distance overridden" when there is no parallax
        n = c.apply_space_motion(new_obstime=Time(obs_mjd, format="mjd", scale="utc"))
    return float(n.ra.rad), float(n.dec.rad)


def read_fits_catalogue(path: Path, obs_mjd: float) -> list[Direction]:
    """The FITS catalogue's rows as targets at the observation epoch."""
    from astropy.table import Table
    try:
        tab = Table.read(path)
    except (OSError, ValueError) as exc:
        raise TargetError(f"--FitsCatalog {path}: cannot read it ({exc})") from None
    missing = [c for c in CATALOGUE_COLUMNS if c not in tab.colnames]
    if missing:
        raise TargetError(f"--FitsCatalog {path} lacks the columns {', '.join(missing)}")
    out = []
    for row in tab:
        ra, dec, pmra = _float(row["ra"]), _float(row["dec"]), _float(row["pmra"])
        if math.isnan(pmra) or math.isnan(_float(row["ref_epoch"])):
            rar, decr = math.radians(ra), math.radians(dec)
        else:
            rar, decr = _moved(ra, dec, pmra, _float(row["pmdec"]), _float(row["ref_epoch"]),
                               _float(row["parallax"]), obs_mjd)
        out.append(Direction(_text(row["DESIGNATION"]), rar, decr, _text(row["Type"]), "TARGET"))
    return out


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v).strip()


def read_srclist(path: Path) -> list[Direction]:
    """``Name,ra,dec,Type`` lines (degrees); lines whose ra/dec are not numbers are skipped."""
    out = []
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if len(row) < 3 or math.isnan(_float(row[1])) or math.isnan(_float(row[2])):
                continue
            kind = row[3].strip() if len(row) > 3 else "Source"
            out.append(Direction(row[0].strip(), math.radians(float(row[1])),
                                 math.radians(float(row[2])), kind, "TARGET"))
    return out


def within(dirs: list[Direction], ra0: float, dec0: float, rad_deg: float) -> list[Direction]:
    """The directions at most ``rad_deg`` from (ra0, dec0)."""
    if not dirs:
        return []
    from astropy.coordinates import SkyCoord
    c = SkyCoord([d.ra for d in dirs], [d.dec for d in dirs], unit="rad")
    sep = c.separation(SkyCoord(ra0, dec0, unit="rad")).deg
    return [d for d, s in zip(dirs, sep) if s <= rad_deg]


# ------------------------------------------------------------------------------ facets


@dataclass(frozen=True)
class Facet:
    id: int
    poly: np.ndarray  # (n, 2) l, m radians about the image centre
    isol: int


def read_dicofacet(path: Path) -> dict:
    """A DDFacet ``.DicoFacet``: a pickled dict of numpy arrays and numbers, one per facet."""
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError, ModuleNotFoundError) as exc:
        raise TargetError(f"--DicoFacet {path}: cannot read it ({exc})") from None


def load_facets(path: Path, ra0: float, dec0: float) -> list[Facet]:
    """The facets of a DDFacet ``.DicoFacet``. Their (l, m) are about DDF's image centre; a
    facet centre that does not land on its recorded RA/Dec when taken about (ra0, dec0) means
    another centre, and the polygons would be misplaced: refused."""
    dico = read_dicofacet(path)
    _check_centre(dico, path, ra0, dec0)
    return [Facet(int(k), np.asarray(v["Polygon"], dtype=float),
                  int(np.atleast_1d(v.get("iSol", [-1]))[0])) for k, v in sorted(dico.items())]


def _check_centre(dico: dict, path: Path, ra0: float, dec0: float) -> None:
    for v in dico.values():
        if "l0m0" in v and "RaDec" in v:
            ra, dec = lm_to_radec(np.array([v["l0m0"][0]]), np.array([v["l0m0"][1]]), ra0, dec0)
            err = math.degrees(math.hypot((ra[0] - v["RaDec"][0]) * math.cos(dec0), dec[0] - v["RaDec"][1]))
            if err * 3600 > 1.0:
                raise TargetError(f"--DicoFacet {path}: made about another phase centre "
                                  f"(facet centres {err * 3600:.1f}\" off)", "give the final image's DicoFacet")
            return


def facets_meeting_circle(facets: list[Facet], radius: float) -> list[Facet]:
    """The facets that meet the circle of ``radius`` (l, m) about the centre."""
    from matplotlib.path import Path as MplPath
    circle = MplPath.circle((0.0, 0.0), radius)
    return [f for f in facets if MplPath(f.poly).intersects_path(circle, filled=True)]


def _draw_in_facet(f: Facet, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` accepted points of one facet (fewer, with a warning, for a sliver)."""
    lo, hi = f.poly.min(axis=0), f.poly.max(axis=0)
    got: list[np.ndarray] = []
    clear = math.radians(OFF_CLEAR_ARCSEC / 3600)
    for _ in range(_MAX_DRAWS):
        cand = lo + (hi - lo) * rng.random((4 * n, 2))
        got.extend(cand[inside_fraction(f.poly, cand, clear) >= OFF_INSIDE_FRACTION])
        if len(got) >= n:
            return np.array(got[:n])
    print(f"facet {f.id}: only {len(got)} of {n} off positions fit", flush=True)
    return np.array(got).reshape(-1, 2)


def off_in_facets(facets: list[Facet], rad_deg: float, noff: int, nmin: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Off positions (l, m), shape (n, 2), spread over the facets that meet the rad circle."""
    near = facets_meeting_circle(facets, math.sin(math.radians(rad_deg)))
    if not near:
        return np.zeros((0, 2))
    per = max(nmin, noff // len(near))
    return np.concatenate([_draw_in_facet(f, per, rng) for f in near])


def off_random(ra0: float, dec0: float, rad_deg: float, noff: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``noff`` positions uniform on the sphere within ``rad_deg`` of the centre (radians)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    cos_sep = rng.uniform(math.cos(math.radians(rad_deg)), 1.0, noff)
    pa = rng.uniform(0, 2 * math.pi, noff) * u.rad
    c = SkyCoord(ra0, dec0, unit="rad").directional_offset_by(pa, np.arccos(cos_sep) * u.rad)
    return np.asarray(c.ra.rad), np.asarray(c.dec.rad)


def off_directions(ra: np.ndarray, dec: np.ndarray) -> list[Direction]:
    return [Direction(f"Off{i:04d}", float(a), float(d), "Off", "OFF") for i, (a, d) in enumerate(zip(ra, dec))]


def tag(dirs: list[Direction], facets: list[Facet], ra0: float, dec0: float) -> list[Direction]:
    """Each direction with the facet that overlaps most with a 0.001 deg circle about it."""
    if not facets or not dirs:
        return dirs
    l, m = radec_to_lm(np.array([d.ra for d in dirs]), np.array([d.dec for d in dirs]), ra0, dec0)
    lm = np.stack([l, m], axis=1)
    frac = np.stack([inside_fraction(f.poly, lm, math.radians(TAG_RADIUS_DEG)) for f in facets], axis=1)
    best = frac.argmax(axis=1)
    return [replace(d, facet=facets[b].id, tessel=facets[b].isol) if frac[i, b] > 0 else d
            for i, (d, b) in enumerate(zip(dirs, best))]
