"""A small simulated LOFAR-like field, written with python-casacore, for tests and the demo.

``simulate_field(outdir)`` writes everything a ddf-pipeline style reduction of the field needs:
one Measurement Set per subband (``SIM_SB000.ms``, ...), the true sky (``skymodel.txt``), the
calibration directions in killMS/DDFacet ClusterCat format (``nodes.npy``), the injected
direction-dependent phases (``true_dde_phases.npz``, only when there are any), the MS lists and a
scaled-down ``hpcddf.cfg``. A reduction can then be checked against the truth.

Conventions (they decide whether DDFacet images come out right or mirrored):

* ``UVW`` of a row is ``uvw(ANTENNA2) - uvw(ANTENNA1)`` in the J2000 frame of the phase centre
  (the casacore definition), computed with ``casacore.measures`` from the ITRF positions.
* ``l = cos(dec) sin(ra - ra0)``, ``m = sin(dec) cos(dec0) - cos(dec) sin(dec0) cos(ra - ra0)``,
  ``n = sqrt(1 - l^2 - m^2)``.
* For the row of stations p = ANTENNA1, q = ANTENNA2, with (u, v, w) in wavelengths::

      V_pq = sum_s S_s * exp(i (phi_p,d(s)(t) - phi_q,d(s)(t))) * exp(+2 pi i (u l + v m + w (n - 1)))

  i.e. ``J_p M J_q^H`` with the scalar Jones ``J = exp(i phi)``, where ``d(s)`` is the node
  (calibration direction) nearest to source ``s``. With ``exp(-...)`` instead, DDFacet puts every
  source at ``(-l, -m)``. XX = YY = V, XY = YX = 0, then gaussian noise on every correlation.

Run as a program: ``python -m hpcddf.lofar.simulate OUTDIR [--n-ms N --dde-rms-deg D ...]``.
Needs the science stack (numpy, python-casacore).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcddf.engine.atomic import write_bytes_atomic, write_text_atomic
from hpcddf.errors import HpcddfError

C_LIGHT = 299_792_458.0  # m/s
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
MEAS_FREQ_REF_TOPO = 5  # casacore MFrequency::Types: REST 0, LSRK 1, LSRD 2, BARY 3, GEO 4, TOPO 5
CORR_TYPES = (9, 10, 11, 12)  # casacore Stokes::StokesTypes XX, XY, YX, YY
CORR_PRODUCT = ((0, 0), (0, 1), (1, 0), (1, 1))

MS_PATTERN = "SIM_SB{:03d}.ms"
SKYMODEL = "skymodel.txt"
NODES = "nodes.npy"
PHASES = "true_dde_phases.npz"
MSLIST = "mslist.txt"
BIG_MSLIST = "big-mslist.txt"
CONFIG = "hpcddf.cfg"
NODES_DTYPE = np.dtype([("Name", "S200"), ("ra", "f8"), ("dec", "f8"), ("SumI", "f8"),
                        ("Cluster", "i8")])

# Independent random streams, so that e.g. turning on DDEs does not move the stations.
_STREAM_STATIONS, _STREAM_DDE, _STREAM_NOISE = 0, 1, 2


@dataclass(frozen=True)
class Source:
    """A flat-spectrum point source (J2000 degrees, Jy)."""

    name: str
    ra_deg: float
    dec_deg: float
    flux_jy: float


# Three well-separated, non-collinear groups around (180, +60), each with a source >= 2 Jy, so
# the default 3 directions each have something bright to calibrate on:
# S1+S5 to the north, S2+S6 to the west, S3+S4 to the south-east (at most 1.1 deg off centre).
DEFAULT_SOURCES: tuple[Source, ...] = (
    Source("S1", 180.615, 60.799, 5.0),
    Source("S2", 178.211, 59.788, 3.0),
    Source("S3", 181.367, 59.193, 2.5),
    Source("S4", 181.773, 59.488, 2.0),
    Source("S5", 181.234, 60.894, 1.5),
    Source("S6", 178.621, 59.493, 1.2),
)

# The pipeline config of the simulated field: ddf-pipeline options scaled down to a 600-pixel
# image of 20" pixels (5 km baselines at 143 MHz). [solutions] ndir follows SimSpec.ndir. The
# MSs have no LOFAR station tables, so no beam: [image] beam_model = None ([control] beam_at
# only takes facet or tessel, so "none" cannot be said there). Point sources need no SSD: HMP
# cleans them in a fraction of SSD's time.
# - The restoring beam is the array's PSF (about 55" x 85" at robust -0.5), as a LoTSS user
#   sets psf_arcsec: a beam 1.8x wider (the 120" used before) weights the uncleaned residual by
#   their area ratio, and PyBDSF's integrated fluxes came out up to 10 % low.
# - The DI-calibrated image is masked at ddf-pipeline's default 10 sigma (thresholds[1]), not
#   6: its direction-dependent artefacts (a sidelobe of S2 at 6-7 sigma) then stay out of the
#   mask instead of being cleaned into the model, where self-calibration keeps them as a
#   spurious source.
SIM_CONFIG: dict[str, dict[str, str]] = {
    "data": {"mslist": MSLIST, "full_mslist": BIG_MSLIST, "colname": "CORRECTED_DATA"},
    "image": {"imsize": "600", "cellsize": "20", "psf_arcsec": "70", "final_psf_arcsec": "70",
              "robust": "-0.5", "final_robust": "-0.5", "do_decorr": "False", "uvmin": "0.0",
              "beam_model": "None", "cleanmode": "HMP"},
    # two 2-MHz subbands cannot separate a TEC from a phase offset: apply the raw solutions
    # an 8-minute observation has no room for ddf-pipeline's 43-minute very slow solutions
    # (killMS hangs solving a single interval)
    # no GlobalNorm of the DD solutions, as every shipped production config (tier1, LGPS) says
    "solutions": {"ndir": "3", "NChanSols": "1", "dt_di": "1.0", "uvmin": "0.0",
                  "smoothing": "False", "do_very_slow": "False", "normalize": "['None','None','None']"},
    "masking": {"thresholds": "[10,10,6,6]", "tgss": "None"},
    "control": {"bootstrap": "False", "clearcache": "False", "polcubes": "False",
                "stokesv": "False"},
}


@dataclass(frozen=True)
class SimSpec:
    """What to simulate; the defaults give about 1 s of work and 5.5 MB per MS."""

    n_ms: int = 2  # subbands, one MS each
    nant: int = 16
    nchan: int = 4  # channels per MS
    chan_width_hz: float = 0.5e6
    freq0_hz: float = 143.0e6  # first channel of MS 0; MS k starts at freq0 + k*nchan*chan_width
    ntime: int = 60
    dt_s: float = 8.0
    ra_deg: float = 180.0
    dec_deg: float = 60.0
    noise_jy: float = 0.05  # gaussian, per real and imaginary part of every visibility
    dde_rms_deg: float = 0.0  # 0: no direction-dependent errors
    ndir: int = 3  # number of DDE directions ("nodes")
    seed: int = 1
    sources: tuple[Source, ...] = DEFAULT_SOURCES
    # a flux-scale error per MS (the sky in MS k is multiplied by flux_scale[k]): what the
    # bootstrap must find and remove; empty = none
    flux_scale: tuple[float, ...] = ()


@dataclass(frozen=True)
class SimResult:
    outdir: Path
    ms: tuple[Path, ...]
    skymodel: Path
    nodes: Path
    phases: Path | None
    config: Path


@dataclass(frozen=True)
class Nodes:
    """The calibration directions and which one each source belongs to."""

    ra_rad: np.ndarray  # (ndir,)
    dec_rad: np.ndarray  # (ndir,)
    sum_flux: np.ndarray  # (ndir,) total flux of the sources assigned to each
    source_node: np.ndarray  # (nsrc,) index of the nearest node of each source


# ------------------------------------------------------------------------------ checks


def check_spec(spec: SimSpec) -> None:
    """Refuse a spec that would give an empty, degenerate or meaningless field."""
    positive = {"n_ms": spec.n_ms, "nchan": spec.nchan, "ntime": spec.ntime, "ndir": spec.ndir,
                "chan_width_hz": spec.chan_width_hz, "freq0_hz": spec.freq0_hz,
                "dt_s": spec.dt_s}
    for name, value in positive.items():
        if not value > 0:
            raise HpcddfError(f"simulation {name} = {value} must be positive")
    if spec.nant < 2:
        raise HpcddfError(f"simulation nant = {spec.nant}: need at least 2 stations")
    if spec.noise_jy < 0 or spec.dde_rms_deg < 0:
        raise HpcddfError("simulation noise_jy and dde_rms_deg must not be negative")
    if not spec.sources:
        raise HpcddfError("simulation has no sources", "give at least one Source")
    names = [s.name for s in spec.sources]
    for name in names:
        if not name or any(c.isspace() for c in name) or name.startswith("#"):
            raise HpcddfError(f"source name {name!r} is empty, has white space or starts with #",
                              "use names like S1 (they are written to a text sky model)")
    if len(set(names)) != len(names):
        raise HpcddfError("simulation source names are not unique", "give every source its own name")
    if spec.flux_scale and (len(spec.flux_scale) != spec.n_ms or min(spec.flux_scale) <= 0):
        raise HpcddfError(f"flux_scale {spec.flux_scale} must give one positive factor per MS",
                          f"give {spec.n_ms} factors")
    if spec.ndir > len(spec.sources):
        raise HpcddfError(f"ndir = {spec.ndir} directions but only {len(spec.sources)} sources",
                          "use at most one direction per source")


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
    rng = np.random.default_rng([spec.seed, _STREAM_STATIONS])
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


# ------------------------------------------------------------------------------ corruptions


def dde_phases(spec: SimSpec, times: np.ndarray, en: np.ndarray | None = None) -> np.ndarray:
    """Direction-dependent station phases (radians), shape (ntime, nant, ndir).

    One ionosphere: the same for every channel and every MS. For each station and direction,
    an offset plus a linear drift over the observation, both drawn from a standard normal (station
    0 too: only differences are visible); then each direction is scaled so that its rms over
    stations and times is exactly ``dde_rms_deg``. All zero when ``dde_rms_deg`` is 0.

    With the stations' east/north positions ``en`` (nant, 2), the part of each phase screen that
    is linear across the array is removed first: a phase gradient only moves a source, which
    self-calibration cannot see (the model inherits the shift) and which ddf-pipeline corrects
    with its astrometric offsets step against an optical catalogue instead.
    """
    phases = np.zeros((spec.ntime, spec.nant, spec.ndir))
    if spec.dde_rms_deg <= 0:
        return phases
    rng = np.random.default_rng([spec.seed, _STREAM_DDE])
    offset = rng.standard_normal((spec.nant, spec.ndir))
    drift = rng.standard_normal((spec.nant, spec.ndir))
    half = (times[-1] - times[0]) / 2.0
    tau = (times - times.mean()) / half if half > 0 else np.zeros_like(times)  # -1 .. 1
    phases = offset[None, :, :] + drift[None, :, :] * tau[:, None, None]
    if en is not None:
        design = np.column_stack([np.ones(len(en)), en[:, 0], en[:, 1]])
        coef, *_ = np.linalg.lstsq(design, phases.transpose(1, 0, 2).reshape(len(en), -1), rcond=None)
        plane = (design @ coef).reshape(len(en), spec.ntime, spec.ndir).transpose(1, 0, 2)
        phases = phases - plane
    rms = np.sqrt((phases**2).mean(axis=(0, 1)))
    return phases * (math.radians(spec.dde_rms_deg) / np.where(rms > 0, rms, 1.0))


def channel_freqs(spec: SimSpec, ms_index: int) -> np.ndarray:
    """Channel centres (Hz) of MS ``ms_index``: the subbands follow on without gaps."""
    first = spec.freq0_hz + ms_index * spec.nchan * spec.chan_width_hz
    return first + np.arange(spec.nchan) * spec.chan_width_hz


def predict(uvw: np.ndarray, freqs: np.ndarray, row_time: np.ndarray, a1: np.ndarray,
            a2: np.ndarray, spec: SimSpec, nodes: Nodes, phases: np.ndarray) -> np.ndarray:
    """Noise-free XX (= YY) of every row and channel, (nrow, nchan), by a direct Fourier sum
    with the sign convention and Jones model of the module docstring."""
    ra0, dec0 = math.radians(spec.ra_deg), math.radians(spec.dec_deg)
    vis = np.zeros((len(uvw), len(freqs)), dtype=np.complex128)
    wavenumber = 2 * np.pi * freqs / C_LIGHT  # rad per metre
    for s, src in enumerate(spec.sources):
        l_, m_, n_ = lmn(np.radians(src.ra_deg), np.radians(src.dec_deg), ra0, dec0)
        path = uvw[:, 0] * l_ + uvw[:, 1] * m_ + uvw[:, 2] * (n_ - 1.0)  # metres
        d = nodes.source_node[s]
        gain = np.exp(1j * (phases[row_time, a1, d] - phases[row_time, a2, d]))
        vis += src.flux_jy * gain[:, None] * np.exp(1j * path[:, None] * wavenumber[None, :])
    return vis


# ------------------------------------------------------------------------------ the MS


def _casacore_tables() -> Any:
    try:
        from casacore import tables
    except ImportError as exc:
        raise HpcddfError(f"python-casacore is not installed ({exc})",
                          "install the science stack: pip install 'hpcddf[science]'") from None
    return tables


@dataclass(frozen=True)
class _Obs:
    """What every MS of the field shares."""

    names: list[str]
    itrf: np.ndarray
    times: np.ndarray  # (ntime,) MJD seconds
    ant_uvw: np.ndarray  # (ntime, nant, 3)
    nodes: Nodes
    phases: np.ndarray  # (ntime, nant, ndir)


def _write_ms(path: Path, spec: SimSpec, ms_index: int, obs: _Obs) -> None:
    """Build one MS under ``.<name>.tmp`` and rename it into place when complete."""
    ct = _casacore_tables()
    tmp = path.parent / f".{path.name}.tmp"
    if tmp.exists():  # left by an interrupted run: ours by its name
        shutil.rmtree(tmp)
    nchan = spec.nchan
    desc = ct.maketabdesc([
        ct.makearrcoldesc("DATA", 0j, shape=[nchan, 4], valuetype="complex", options=4),
        ct.makearrcoldesc("FLAG", False, shape=[nchan, 4], valuetype="boolean", options=4),
        ct.makearrcoldesc("SIGMA", 1.0, shape=[4], valuetype="float", options=4),
        ct.makearrcoldesc("WEIGHT", 1.0, shape=[4], valuetype="float", options=4),
    ])
    ms = ct.default_ms(str(tmp), desc)
    try:
        ms.addcols(ct.maketabdesc([
            ct.makearrcoldesc(name, 0j, shape=[nchan, 4], valuetype="complex", options=4)
            for name in ("CORRECTED_DATA", "MODEL_DATA")]))
        ms.addcols(ct.maketabdesc([ct.makearrcoldesc("WEIGHT_SPECTRUM", 1.0, shape=[nchan, 4],
                                                     valuetype="float", options=4)]))
        _fill_main(ms, spec, ms_index, obs)
    finally:
        ms.close()
    _fill_subtables(ct, tmp, spec, ms_index, obs)
    os.rename(tmp, path)


def _fill_main(ms: Any, spec: SimSpec, ms_index: int, obs: _Obs) -> None:
    a1, a2 = baseline_pairs(spec.nant)
    nbl = len(a1)
    nrow = spec.ntime * nbl
    row_time = np.repeat(np.arange(spec.ntime), nbl)
    ant1, ant2 = np.tile(a1, spec.ntime), np.tile(a2, spec.ntime)
    uvw = obs.ant_uvw[row_time, ant2] - obs.ant_uvw[row_time, ant1]
    freqs = channel_freqs(spec, ms_index)
    xx = predict(uvw, freqs, row_time, ant1, ant2, spec, obs.nodes, obs.phases)
    if spec.flux_scale:
        xx = xx * np.float32(spec.flux_scale[ms_index])
    data = np.zeros((nrow, spec.nchan, 4), dtype=np.complex64)
    data[:, :, 0] = xx
    data[:, :, 3] = xx
    if spec.noise_jy > 0:
        rng = np.random.default_rng([spec.seed, _STREAM_NOISE, ms_index])
        noise = rng.standard_normal((nrow, spec.nchan, 4, 2)) * spec.noise_jy
        data += (noise[..., 0] + 1j * noise[..., 1]).astype(np.complex64)

    ms.addrows(nrow)
    t = obs.times[row_time]
    zeros = np.zeros(nrow, dtype=np.int32)
    columns: dict[str, Any] = {
        "TIME": t, "TIME_CENTROID": t,
        "INTERVAL": np.full(nrow, spec.dt_s), "EXPOSURE": np.full(nrow, spec.dt_s),
        "ANTENNA1": ant1, "ANTENNA2": ant2, "FEED1": zeros, "FEED2": zeros,
        "UVW": uvw, "DATA_DESC_ID": zeros, "FIELD_ID": zeros, "SCAN_NUMBER": zeros + 1,
        "ARRAY_ID": zeros, "OBSERVATION_ID": zeros, "STATE_ID": zeros, "PROCESSOR_ID": zeros,
        "FLAG_ROW": np.zeros(nrow, dtype=bool),
        "FLAG": np.zeros((nrow, spec.nchan, 4), dtype=bool),
        "WEIGHT": np.ones((nrow, 4), dtype=np.float32),
        "SIGMA": np.ones((nrow, 4), dtype=np.float32),
        "WEIGHT_SPECTRUM": np.ones((nrow, spec.nchan, 4), dtype=np.float32),
        "DATA": data, "CORRECTED_DATA": data,  # the pipeline reads CORRECTED_DATA
        "MODEL_DATA": np.zeros_like(data),
    }
    for name, values in columns.items():
        ms.putcol(name, values)
    # default_ms labels UVW as ITRF; ours are in the J2000 frame of PHASE_DIR, as in real MSs
    ms.putcolkeyword("UVW", "MEASINFO", {"type": "uvw", "Ref": "J2000"})


def _put_rows(ct: Any, path: Path, nrow: int, columns: dict[str, Any],
              cells: dict[str, list[Any]] | None = None) -> None:
    """Add ``nrow`` rows to a subtable and fill it: whole columns, then per-row cells (for the
    variable-shape array columns, whose shape casacore learns from the first value put)."""
    with ct.table(str(path), readonly=False, ack=False) as sub:
        sub.addrows(nrow)
        for name, values in columns.items():
            sub.putcol(name, values)
        for name, values in (cells or {}).items():
            for row, value in enumerate(values):
                sub.putcell(name, row, value)


def _fill_subtables(ct: Any, ms: Path, spec: SimSpec, ms_index: int, obs: _Obs) -> None:
    nant = spec.nant
    t0 = obs.times[0] - spec.dt_s / 2
    t1 = obs.times[-1] + spec.dt_s / 2
    _put_rows(ct, ms / "ANTENNA", nant, {
        "NAME": obs.names, "STATION": ["LOFAR"] * nant, "TYPE": ["GROUND-BASED"] * nant,
        "MOUNT": ["X-Y"] * nant, "POSITION": obs.itrf, "OFFSET": np.zeros((nant, 3)),
        "DISH_DIAMETER": np.full(nant, DISH_DIAMETER_M), "FLAG_ROW": np.zeros(nant, dtype=bool),
    })
    _put_rows(ct, ms / "FEED", nant, {
        "ANTENNA_ID": np.arange(nant, dtype=np.int32), "FEED_ID": np.zeros(nant, dtype=np.int32),
        "SPECTRAL_WINDOW_ID": np.full(nant, -1, dtype=np.int32),
        "TIME": np.full(nant, (t0 + t1) / 2), "INTERVAL": np.full(nant, t1 - t0),
        "NUM_RECEPTORS": np.full(nant, 2, dtype=np.int32),
        "BEAM_ID": np.full(nant, -1, dtype=np.int32), "POSITION": np.zeros((nant, 3)),
    }, {
        "BEAM_OFFSET": [np.zeros((2, 2))] * nant,
        "POLARIZATION_TYPE": [np.array(["X", "Y"])] * nant,
        "POL_RESPONSE": [np.eye(2, dtype=np.complex64)] * nant,
        "RECEPTOR_ANGLE": [np.array([0.0, math.pi / 2])] * nant,  # orthogonal X and Y dipoles
    })
    freqs = channel_freqs(spec, ms_index)
    width = np.full(spec.nchan, spec.chan_width_hz)
    _put_rows(ct, ms / "SPECTRAL_WINDOW", 1, {
        "NAME": [f"SB-{ms_index:03d}"], "NUM_CHAN": [spec.nchan],
        "REF_FREQUENCY": [float(freqs.mean())],
        "TOTAL_BANDWIDTH": [spec.nchan * spec.chan_width_hz],
        "MEAS_FREQ_REF": [MEAS_FREQ_REF_TOPO], "NET_SIDEBAND": [1], "FREQ_GROUP": [0],
        "FREQ_GROUP_NAME": [""], "IF_CONV_CHAIN": [0], "FLAG_ROW": [False],
    }, {
        "CHAN_FREQ": [freqs], "CHAN_WIDTH": [width], "EFFECTIVE_BW": [width],
        "RESOLUTION": [width],
    })
    _put_rows(ct, ms / "POLARIZATION", 1, {"NUM_CORR": [4], "FLAG_ROW": [False]}, {
        "CORR_TYPE": [np.array(CORR_TYPES, dtype=np.int32)],
        "CORR_PRODUCT": [np.array(CORR_PRODUCT, dtype=np.int32)],
    })
    _put_rows(ct, ms / "DATA_DESCRIPTION", 1, {
        "SPECTRAL_WINDOW_ID": [0], "POLARIZATION_ID": [0], "FLAG_ROW": [False]})
    direction = np.array([[math.radians(spec.ra_deg), math.radians(spec.dec_deg)]])
    _put_rows(ct, ms / "FIELD", 1, {
        "NAME": ["SIM"], "CODE": [""], "TIME": [(t0 + t1) / 2], "NUM_POLY": [0],
        "SOURCE_ID": [-1], "FLAG_ROW": [False],
    }, {"PHASE_DIR": [direction], "DELAY_DIR": [direction], "REFERENCE_DIR": [direction]})
    _put_rows(ct, ms / "OBSERVATION", 1, {
        "TELESCOPE_NAME": ["LOFAR"], "TIME_RANGE": np.array([[t0, t1]]),
        "OBSERVER": ["hpcddf.lofar.simulate"], "PROJECT": ["hpcddf-sim"], "SCHEDULE_TYPE": [""],
        "RELEASE_DATE": [0.0], "FLAG_ROW": [False],
    }, {"LOG": [np.array(["simulated by hpcddf.lofar.simulate"])], "SCHEDULE": [np.array([""])]})
    _put_rows(ct, ms / "STATE", 1, {
        "SIG": [True], "REF": [False], "CAL": [0.0], "LOAD": [0.0], "SUB_SCAN": [0],
        "OBS_MODE": [""], "FLAG_ROW": [False]})
    _put_rows(ct, ms / "PROCESSOR", 1, {
        "TYPE": ["CORRELATOR"], "SUB_TYPE": [""], "TYPE_ID": [-1], "MODE_ID": [-1],
        "FLAG_ROW": [False]})


# ------------------------------------------------------------------------------ text files


def write_catalogue(path: Path, sources: Iterable[Source], rel_err: float = 0.05) -> Path:
    """The true sky as a PyBDSM-format catalogue (RA, DEC, Total_flux, E_Total_flux in Jy; the
    sources are flat-spectrum, so it serves at any frequency): a stand-in for VLSS/WENSS in
    bootstrap and quality tests, which must not need the network."""
    from astropy.table import Table

    from hpcddf.engine.atomic import atomic_path
    src = list(sources)
    table = Table({"RA": [s.ra_deg for s in src], "DEC": [s.dec_deg for s in src],
                   "Total_flux": [s.flux_jy for s in src],
                   "E_Total_flux": [rel_err * s.flux_jy for s in src]})
    with atomic_path(path) as tmp:
        table.write(tmp, format="fits", overwrite=True)
    return Path(path)


def write_tgss_catalogue(path: Path, sources: Iterable[Source]) -> Path:
    """The true sky in TGSS ADR1's columns (RA, DEC, Peak_flux and Total_flux in mJy), what
    ``[masking] tgss`` reads to draw the external and bootstrap clean masks."""
    from astropy.table import Table

    from hpcddf.engine.atomic import atomic_path
    src = list(sources)
    mjy = [1e3 * s.flux_jy for s in src]
    table = Table({"RA": [s.ra_deg for s in src], "DEC": [s.dec_deg for s in src],
                   "Peak_flux": mjy, "Total_flux": mjy})
    with atomic_path(path) as tmp:
        table.write(tmp, format="fits", overwrite=True)
    return Path(path)


def skymodel_text(sources: Iterable[Source]) -> str:
    """The true sky as text: ``name ra_deg dec_deg flux_jy`` per line (J2000, flat spectrum)."""
    lines = ["# hpcddf.lofar.simulate true sky: flat-spectrum point sources, J2000",
             "# name ra_deg dec_deg flux_jy"]
    lines += [f"{s.name} {s.ra_deg!r} {s.dec_deg!r} {s.flux_jy!r}" for s in sources]
    return "\n".join(lines) + "\n"


def read_skymodel(path: Path) -> list[Source]:
    """Parse a sky model written by :func:`simulate_field` (``#`` comments, blank lines ok)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HpcddfError(f"cannot read sky model {path}: {exc.strerror or exc}",
                          "check the path") from None
    sources = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        try:
            if len(fields) != 4:
                raise ValueError(f"{len(fields)} fields")
            sources.append(Source(fields[0], float(fields[1]), float(fields[2]), float(fields[3])))
        except ValueError as exc:
            raise HpcddfError(f"{path}:{lineno}: bad sky model line {line!r} ({exc})",
                              "each line must be: name ra_deg dec_deg flux_jy") from None
    return sources


def config_text(spec: SimSpec) -> str:
    """The ``hpcddf.cfg`` of the simulated field (SIM_CONFIG, with ``ndir`` from the spec)."""
    values = {section: dict(opts) for section, opts in SIM_CONFIG.items()}
    values["solutions"]["ndir"] = str(spec.ndir)
    lines = ["# ddf-pipeline config for the field simulated by hpcddf.lofar.simulate (scaled down)"]
    for section, opts in values.items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {value}" for name, value in opts.items()]
        lines.append("")
    return "\n".join(lines)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ------------------------------------------------------------------------------ the field


def ms_paths(outdir: Path, spec: SimSpec) -> tuple[Path, ...]:
    return tuple(Path(outdir) / MS_PATTERN.format(k) for k in range(spec.n_ms))


def simulate_field(outdir: Path, spec: SimSpec = SimSpec()) -> SimResult:
    """Write the simulated field into ``outdir`` (created if needed); see the module docstring.

    Refuses (HpcddfError) if any of the MSs already exists: the simulation never overwrites
    data. The other files are replaced atomically.
    """
    check_spec(spec)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise HpcddfError(f"{outdir} exists and is not a directory", "give a directory to simulate into")
    paths = ms_paths(outdir, spec)
    for path in paths:
        if os.path.lexists(path):
            raise HpcddfError(f"{path} already exists; the simulation does not overwrite an MS",
                              "remove it or simulate into another directory")
    _casacore_tables()  # fail with the install hint before any work
    outdir.mkdir(parents=True, exist_ok=True)

    names, itrf = station_layout(spec)
    times = integration_times(spec)
    nodes = choose_nodes(spec.sources, spec.ndir, spec.ra_deg, spec.dec_deg)
    obs = _Obs(names=names, itrf=itrf, times=times,
               ant_uvw=antenna_uvw(itrf, times, spec.ra_deg, spec.dec_deg), nodes=nodes,
               phases=dde_phases(spec, times, station_en(itrf)))
    for k, path in enumerate(paths):
        _write_ms(path, spec, k, obs)

    skymodel = write_text_atomic(outdir / SKYMODEL, skymodel_text(spec.sources))
    nodes_path = write_bytes_atomic(outdir / NODES, _npy_bytes(nodes_array(nodes)))
    phases_path = None
    if spec.dde_rms_deg > 0:
        phases_path = write_bytes_atomic(outdir / PHASES, _npz_bytes(
            phases_rad=obs.phases, times=times, node_ra_rad=nodes.ra_rad,
            node_dec_rad=nodes.dec_rad))
    write_text_atomic(outdir / MSLIST, paths[0].name + "\n")
    write_text_atomic(outdir / BIG_MSLIST, "".join(p.name + "\n" for p in paths))
    config = write_text_atomic(outdir / CONFIG, config_text(spec))
    return SimResult(outdir=outdir, ms=paths, skymodel=skymodel, nodes=nodes_path,
                     phases=phases_path, config=config)


# ------------------------------------------------------------------------------ the program


def main(argv: Sequence[str] | None = None) -> int:
    d = SimSpec()
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.simulate",
                                 description="Write a small simulated LOFAR-like field.")
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--n-ms", type=int, default=d.n_ms, help=f"subbands, one MS each ({d.n_ms})")
    ap.add_argument("--dde-rms-deg", type=float, default=d.dde_rms_deg,
                    help="rms of the direction-dependent phase errors (0: none)")
    ap.add_argument("--ndir", type=int, default=d.ndir, help=f"DDE directions ({d.ndir})")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--noise", type=float, default=d.noise_jy,
                    help=f"Jy per real/imaginary part ({d.noise_jy})")
    ap.add_argument("--ntime", type=int, default=d.ntime, help=f"integrations of {d.dt_s:g} s")
    args = ap.parse_args(argv)
    spec = SimSpec(n_ms=args.n_ms, dde_rms_deg=args.dde_rms_deg, ndir=args.ndir, seed=args.seed,
                   noise_jy=args.noise, ntime=args.ntime)
    try:
        res = simulate_field(args.outdir, spec)
    except HpcddfError as exc:
        print(f"hpcddf: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    nrow = spec.ntime * spec.nant * (spec.nant - 1) // 2
    for k, ms in enumerate(res.ms):
        f = channel_freqs(spec, k) / 1e6
        print(f"wrote {ms} ({nrow} rows, {spec.nchan} channels {f[0]:.3f}-{f[-1]:.3f} MHz)")
    print(f"wrote {res.skymodel} ({len(spec.sources)} sources)")
    print(f"wrote {res.nodes} ({spec.ndir} directions)")
    if res.phases:
        print(f"wrote {res.phases} (rms {spec.dde_rms_deg:g} deg)")
    print(f"wrote {res.outdir / MSLIST}, {res.outdir / BIG_MSLIST}, {res.config}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
