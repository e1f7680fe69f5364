"""Where and when the simulated LOFAR-like array observes: stations, times, UVW, directions.

Part of :mod:`hpcddf.lofar.simulate` (which re-exports every public name here). The conventions
that decide whether DDFacet images come out right or mirrored are in that module's docstring;
this module holds the geometry they rest on:

* ``UVW`` of a row is ``uvw(ANTENNA2) - uvw(ANTENNA1)`` in the J2000 frame of the phase centre
  (the casacore definition), computed with ``casacore.measures`` from the ITRF positions.
* ``l = cos(dec) sin(ra - ra0)``, ``m = sin(dec) cos(dec0) - cos(dec) sin(dec0) cos(ra - ra0)``,
  ``n = sqrt(1 - l^2 - m^2)``.
* The calibration directions ("nodes") are flux-weighted groups of the sources, written in
  killMS/DDFacet ClusterCat format.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from hpcddf.errors import HpcddfError
from hpcddf.lofar.sim_sky import Source
from hpcddf.lofar.sim_spec import SimSpec

# LOFAR CS002 (the array reference), ITRF metres; all stations are scattered around it.
CS002_ITRF = (3826577.1, 461022.9, 5064892.8)
ARRAY_RADIUS_M = 2500.0  # every station within this of CS002, so no baseline exceeds 5 km
CORE_RADIUS_M = 1000.0  # stations inside are named CSnnnHBA, the others RSnnnHBA
MIN_SEPARATION_M = 60.0  # about two HBA stations: no baseline is shorter
DISH_DIAMETER_M = 30.0
# The night of the observation: 2024-03-21, when RA 12h transits near local midnight.
OBS_DAY_MJD = 60390.0
WGS84_A = 6378137.0
WGS84_F = 1.0 / 298.257223563
NODES_DTYPE = np.dtype([("Name", "S200"), ("ra", "f8"), ("dec", "f8"), ("SumI", "f8"),
                        ("Cluster", "i8")])

# Independent random streams, so that e.g. turning on DDEs does not move the stations.
STREAM_STATIONS, STREAM_DDE, STREAM_NOISE = 0, 1, 2


@dataclass(frozen=True)
class Nodes:
    """The calibration directions and which one each source belongs to."""

    ra_rad: np.ndarray  # (ndir,)
    dec_rad: np.ndarray  # (ndir,)
    sum_flux: np.ndarray  # (ndir,) total flux of the sources assigned to each
    source_node: np.ndarray  # (nsrc,) index of the nearest node of each source




# ------------------------------------------------------------------------------ geometry


def lmn(ra_rad: np.ndarray, dec_rad: np.ndarray, ra0_rad: float, dec0_rad: float
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Direction cosines (l, m, n) of (ra, dec) relative to the phase centre (ra0, dec0)."""
    dra = ra_rad - ra0_rad
    l_ = np.cos(dec_rad) * np.sin(dra)
    m_ = np.sin(dec_rad) * np.cos(dec0_rad) - np.cos(dec_rad) * np.sin(dec0_rad) * np.cos(dra)
    n_ = np.sqrt(1.0 - l_**2 - m_**2)
    return l_, m_, n_


def _unit_vectors(ra_rad: np.ndarray, dec_rad: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(dec_rad) * np.cos(ra_rad), np.cos(dec_rad) * np.sin(ra_rad),
                     np.sin(dec_rad)], axis=-1)


def _angular_distance(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray
                      ) -> np.ndarray:
    """Great-circle distance (radians) with the haversine formula (exact at small angles)."""
    h = (np.sin((dec2 - dec1) / 2) ** 2
         + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2)
    return 2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def enu_basis(itrf: Sequence[float]) -> np.ndarray:
    """Unit vectors east, north, up (rows) of the WGS84 horizon at an ITRF position."""
    x, y, z = itrf
    e2 = WGS84_F * (2 - WGS84_F)
    lon = math.atan2(y, x)
    p = math.hypot(x, y)
    lat = math.atan2(z, p * (1 - e2))
    for _ in range(5):  # converges to well below a micro-radian
        n = WGS84_A / math.sqrt(1 - e2 * math.sin(lat) ** 2)
        h = p / math.cos(lat) - n
        lat = math.atan2(z, p * (1 - e2 * n / (n + h)))
    sl, cl, so, co = math.sin(lat), math.cos(lat), math.sin(lon), math.cos(lon)
    return np.array([[-so, co, 0.0], [-sl * co, -sl * so, cl], [cl * co, cl * so, sl]])


def station_layout(spec: SimSpec) -> tuple[list[str], np.ndarray]:
    """Station names and ITRF positions (nant, 3): station 0 at CS002, the others scattered in
    2-D on the horizon plane within ARRAY_RADIUS_M of it (seeded), at least MIN_SEPARATION_M apart.
    """
    rng = np.random.default_rng([spec.seed, STREAM_STATIONS])
    offsets = [np.zeros(2)]
    tries = 0
    while len(offsets) < spec.nant:
        tries += 1
        if tries > 100_000:
            raise HpcddfError(f"cannot place {spec.nant} stations {MIN_SEPARATION_M:g} m apart "
                              f"within {ARRAY_RADIUS_M:g} m", "simulate fewer stations")
        r = ARRAY_RADIUS_M * math.sqrt(rng.uniform())
        theta = rng.uniform(0, 2 * math.pi)
        cand = np.array([r * math.cos(theta), r * math.sin(theta)])
        if all(np.hypot(*(cand - o)) >= MIN_SEPARATION_M for o in offsets):
            offsets.append(cand)
    east, north, _ = enu_basis(CS002_ITRF)
    en = np.array(offsets)
    itrf = np.asarray(CS002_ITRF) + en[:, :1] * east + en[:, 1:] * north
    names = [f"{'CS' if np.hypot(*o) < CORE_RADIUS_M else 'RS'}{i:03d}HBA"
             for i, o in enumerate(offsets)]
    return names, itrf


def station_en(itrf: np.ndarray) -> np.ndarray:
    """East/north offsets (m) of the stations from CS002 on its horizon plane, (nant, 2)."""
    east, north, _ = enu_basis(CS002_ITRF)
    d = np.asarray(itrf) - np.asarray(CS002_ITRF)
    return np.column_stack([d @ east, d @ north])


def gmst_hours(mjd_ut: float) -> float:
    """Greenwich mean sidereal time (hours, 0..24) from the IAU 1982 linear formula: a second
    of accuracy, plenty for putting the observation around transit."""
    return (18.697374558 + 24.06570982441908 * (mjd_ut - 51544.5)) % 24.0


def transit_mjd(ra_deg: float, itrf: Sequence[float], day_mjd: float = OBS_DAY_MJD) -> float:
    """The first time (MJD days) on or after ``day_mjd`` when ``ra_deg`` transits at ``itrf``."""
    lon_h = math.degrees(math.atan2(itrf[1], itrf[0])) / 15.0
    lst0 = (gmst_hours(day_mjd) + lon_h) % 24.0
    wait_sidereal_h = (ra_deg / 15.0 - lst0) % 24.0
    return day_mjd + wait_sidereal_h / 1.00273790935 / 24.0


def integration_times(spec: SimSpec) -> np.ndarray:
    """Centres of the integrations (MJD seconds), the observation centred on the transit of the
    phase centre (to a couple of minutes: precession since J2000 moves the apparent RA a bit)."""
    centre = transit_mjd(spec.ra_deg, CS002_ITRF) * 86400.0
    return centre + (np.arange(spec.ntime) - (spec.ntime - 1) / 2.0) * spec.dt_s


def antenna_uvw(itrf: np.ndarray, times: np.ndarray, ra_deg: float, dec_deg: float) -> np.ndarray:
    """uvw (metres, J2000 frame of the phase centre) of each station relative to CS002:
    shape (ntime, nant, 3). A row's UVW is then ``uvw[t, ant2] - uvw[t, ant1]``.

    ``casacore.measures`` does the Earth rotation, precession and nutation, so the UVW matches
    the J2000 PHASE_DIR that DDFacet and killMS read.
    """
    from casacore.measures import measures
    from casacore.quanta import quantity

    dm = measures()
    dm.do_frame(dm.position("itrf", *(quantity(v, "m") for v in CS002_ITRF)))
    dm.do_frame(dm.direction("j2000", quantity(math.radians(ra_deg), "rad"),
                             quantity(math.radians(dec_deg), "rad")))
    rel = itrf - np.asarray(CS002_ITRF)
    baselines = dm.baseline("itrf", *(quantity(rel[:, k], "m") for k in range(3)))
    out = np.empty((len(times), len(itrf), 3))
    with _without_stderr_lines(_HARMLESS_CASACORE_LOG):
        for i, t in enumerate(times):
            dm.do_frame(dm.epoch("utc", quantity(float(t), "s")))
            xyz = dm.to_uvw(baselines)["xyz"].get_value("m")
            out[i] = np.asarray(xyz, dtype=float).reshape(len(itrf), 3)
    return out


# casacore logs "SEVERE ... Leap second table TAI_UTC seems out-of-date" (3 lines) once its
# bundled table is a year old, though no leap second has been added since 2017: our times are
# right, and the UVW only has to agree with itself, so the alarm is dropped.
_HARMLESS_CASACORE_LOG = ("MeasTable::dUTC(",)


@contextlib.contextmanager
def _without_stderr_lines(drop: tuple[str, ...]) -> Iterator[None]:
    """Capture file descriptor 2 (casacore's C++ logger writes there, not to ``sys.stderr``)
    and pass on every line except those containing one of ``drop``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not any(d in line for d in drop):
                    sys.stderr.write(line)
            sys.stderr.flush()


def baseline_pairs(nant: int) -> tuple[np.ndarray, np.ndarray]:
    """ANTENNA1, ANTENNA2 of all cross baselines (ant1 < ant2), in the usual MS order."""
    a1, a2 = np.triu_indices(nant, k=1)
    return a1.astype(np.int32), a2.astype(np.int32)


# ------------------------------------------------------------------------------ directions


def choose_nodes(sources: Sequence[Source], ndir: int, ra0_deg: float, dec0_deg: float) -> Nodes:
    """``ndir`` calibration directions: flux-weighted centres of groups of the sources.

    Deterministic: seeds by farthest-point sampling from the brightest source, then a few rounds
    of flux-weighted k-means (assign each source to its nearest centre, move each centre to the
    flux-weighted mean of its sources). Each source finally belongs to its nearest node.
    Nearly collinear nodes break DDFacet's facet tessellation and hang killMS, so they are refused.
    """
    ra = np.radians([s.ra_deg for s in sources])
    dec = np.radians([s.dec_deg for s in sources])
    flux = np.array([s.flux_jy for s in sources], dtype=float)
    dist = _angular_distance(ra[:, None], dec[:, None], ra[None, :], dec[None, :])
    seeds = [int(np.argmax(flux))]
    while len(seeds) < ndir:
        seeds.append(int(np.argmax(dist[:, seeds].min(axis=1))))
    c_ra, c_dec = ra[seeds].copy(), dec[seeds].copy()
    member = np.full(len(sources), -1)
    for _ in range(50):
        new = np.argmin(_angular_distance(ra[:, None], dec[:, None], c_ra[None, :], c_dec[None, :]),
                        axis=1)
        if np.array_equal(new, member):
            break
        member = new
        for d in range(ndir):
            sel = member == d
            if sel.any():  # an empty group keeps its centre
                vec = (np.abs(flux[sel])[:, None] * _unit_vectors(ra[sel], dec[sel])).sum(axis=0)
                c_ra[d] = math.atan2(vec[1], vec[0]) % (2 * math.pi)
                c_dec[d] = math.asin(vec[2] / np.linalg.norm(vec))
    member = np.argmin(_angular_distance(ra[:, None], dec[:, None], c_ra[None, :], c_dec[None, :]),
                       axis=1)
    sum_flux = np.array([flux[member == d].sum() for d in range(ndir)])
    nodes = Nodes(ra_rad=c_ra, dec_rad=c_dec, sum_flux=sum_flux, source_node=member)
    _check_not_collinear(nodes, ra0_deg, dec0_deg)
    return nodes


def collinearity(ra_rad: np.ndarray, dec_rad: np.ndarray, ra0_deg: float, dec0_deg: float
                 ) -> float:
    """0 for points on a line, up to 1 for a round spread: the ratio of the smaller to the
    larger singular value of the (l, m) positions about their mean."""
    l_, m_, _ = lmn(np.asarray(ra_rad), np.asarray(dec_rad), math.radians(ra0_deg),
                    math.radians(dec0_deg))
    pts = np.stack([l_, m_], axis=1)
    sv = np.linalg.svd(pts - pts.mean(axis=0), compute_uv=False)
    return float(sv[1] / sv[0]) if sv[0] > 0 else 0.0


def _check_not_collinear(nodes: Nodes, ra0_deg: float, dec0_deg: float) -> None:
    if len(nodes.ra_rad) >= 3 and collinearity(nodes.ra_rad, nodes.dec_rad, ra0_deg,
                                                dec0_deg) < 0.1:
        raise HpcddfError("the simulated calibration directions are (nearly) on a line, which "
                          "breaks DDFacet's facets and hangs killMS",
                          "move the sources off a line or change ndir")


def nodes_array(nodes: Nodes) -> np.ndarray:
    """The nodes as a killMS/DDFacet ClusterCat (``--NodesFile``): radians, Cluster 0..ndir-1."""
    cat = np.zeros(len(nodes.ra_rad), dtype=NODES_DTYPE)
    cat["Name"] = [f"dir{d}".encode() for d in range(len(cat))]
    cat["ra"] = nodes.ra_rad
    cat["dec"] = nodes.dec_rad
    cat["SumI"] = nodes.sum_flux
    cat["Cluster"] = np.arange(len(cat))
    return cat

