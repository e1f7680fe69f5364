"""The true sky of the simulated field: point sources, their polarisation and light curves.

Part of :mod:`hpcddf.lofar.simulate` (which re-exports every public name here). A source is
flat in Stokes I. It may be

* linearly polarised: ``Q + iU = p I exp(2i (chi0 + RM lambda^2))`` at each channel centre
  (no depolarisation within a channel), what ddf-pipeline's Q/U cubes and RM synthesis recover;
* circularly polarised: ``V = v I``, what the Stokes V image and the dynamic spectra see;
* variable: every Stokes parameter times the light curve
  ``1 + flare_amp exp(-(t - flare_t_s)^2 / (2 flare_sigma_s^2))``, with ``t`` the seconds after
  the centre of the first integration, sampled at the centre of each integration (the dynamic
  spectra resolve single integrations, so this is their truth).

Linear feeds (LOFAR's X and Y dipoles): ``XX = I + Q, XY = U + iV, YX = U - iV, YY = I - Q``,
which DDFacet 0.9.1 inverts as ``I = (XX + YY)/2, Q = (XX - YY)/2, U = (XY + YX)/2,
V = -i (XY - YX)/2`` (``DDFacet/Gridder/Stokes.h``, ``Data/ClassStokes.py``) and DynSpecMS the
same way, so a +V source is +V in both. Q and U are in the frame of the feeds: the simulated MSs
have no beam, hence no parallactic rotation.

The sky model text file carries all of it; files with only the first four columns (written
before polarisation and variability existed) still read, as unpolarised constant sources.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np

from hpcddf.errors import HpcddfError

C_LIGHT = 299_792_458.0  # m/s


@dataclass(frozen=True)
class Source:
    """A flat-spectrum point source (J2000 degrees, Jy); unpolarised and constant by default."""

    name: str
    ra_deg: float
    dec_deg: float
    flux_jy: float  # Stokes I outside a flare
    pol_frac: float = 0.0  # p: linearly polarised fraction, 0..1
    rm_rad_m2: float = 0.0  # rotation measure
    chi0_deg: float = 0.0  # polarisation angle at lambda = 0
    circ_frac: float = 0.0  # v = V / I, -1..1
    flare_amp: float = 0.0  # flux at the flare's peak / flux_jy - 1 (0: constant)
    flare_t_s: float = 0.0  # flare centre, seconds after the centre of the first integration
    flare_sigma_s: float = 0.0  # gaussian width (standard deviation) of the flare

    @property
    def polarised(self) -> bool:
        return self.pol_frac != 0.0 or self.circ_frac != 0.0

    @property
    def variable(self) -> bool:
        return self.flare_amp != 0.0


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

SKYMODEL_COLUMNS = tuple(f.name for f in fields(Source))
OLD_SKYMODEL_COLUMNS = SKYMODEL_COLUMNS[:4]


# ------------------------------------------------------------------------------ checks


def check_sources(sources: Sequence[Source]) -> None:
    """Refuse sources a text sky model cannot carry or that have no physical meaning."""
    if not sources:
        raise HpcddfError("simulation has no sources", "give at least one Source")
    names = [s.name for s in sources]
    for name in names:
        if not name or any(c.isspace() for c in name) or name.startswith("#"):
            raise HpcddfError(f"source name {name!r} is empty, has white space or starts with #",
                              "use names like S1 (they are written to a text sky model)")
    if len(set(names)) != len(names):
        raise HpcddfError("simulation source names are not unique", "give every source its own name")
    for src in sources:
        _check_source(src)


def _check_source(src: Source) -> None:
    if not all(math.isfinite(v) for v in astuple(src)[1:]):
        raise HpcddfError(f"source {src.name} has a value that is not finite", "give finite numbers")
    if not (0.0 <= src.pol_frac <= 1.0 and -1.0 <= src.circ_frac <= 1.0
            and src.pol_frac**2 + src.circ_frac**2 <= 1.0 + 1e-12):
        raise HpcddfError(f"source {src.name}: pol_frac {src.pol_frac} and circ_frac {src.circ_frac} "
                          "polarise more than the whole source",
                          "need 0 <= pol_frac, |circ_frac| and pol_frac^2 + circ_frac^2 <= 1")
    if src.flare_amp < 0 or (src.flare_amp > 0 and not src.flare_sigma_s > 0):
        raise HpcddfError(f"source {src.name}: flare_amp {src.flare_amp} with flare_sigma_s "
                          f"{src.flare_sigma_s}", "a flare needs flare_amp >= 0 and flare_sigma_s > 0")


# ------------------------------------------------------------------------------ the physics


def stokes_spectrum(src: Source, freqs_hz: np.ndarray) -> np.ndarray:
    """I, Q, U, V (Jy) of ``src`` at each frequency outside a flare, shape (4, nchan)."""
    freqs_hz = np.asarray(freqs_hz, dtype=float)
    chi = math.radians(src.chi0_deg) + src.rm_rad_m2 * (C_LIGHT / freqs_hz) ** 2
    i = np.full(freqs_hz.shape, src.flux_jy)
    p = src.pol_frac * i
    return np.stack([i, p * np.cos(2 * chi), p * np.sin(2 * chi), src.circ_frac * i])


def light_curve(src: Source, t_s: np.ndarray) -> np.ndarray:
    """The factor on every Stokes parameter at ``t_s`` (seconds after the first integration's
    centre): 1, plus the gaussian flare."""
    t_s = np.asarray(t_s, dtype=float)
    if not src.variable:
        return np.ones_like(t_s)
    return 1.0 + src.flare_amp * np.exp(-0.5 * ((t_s - src.flare_t_s) / src.flare_sigma_s) ** 2)


def linear_correlations(i: np.ndarray, q: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """XX, XY, YX, YY of linear feeds from Stokes visibilities, stacked on a last axis of 4."""
    return np.stack([i + q, u + 1j * v, u - 1j * v, i - q], axis=-1)


def stokes_from_linear(corr: np.ndarray) -> np.ndarray:
    """I, Q, U, V from XX, XY, YX, YY on the last axis, as DDFacet and DynSpecMS form them."""
    xx, xy, yx, yy = (corr[..., k] for k in range(4))
    return np.stack([(xx + yy) / 2, (xx - yy) / 2, (xy + yx) / 2, -0.5j * (xy - yx)], axis=-1)


# ------------------------------------------------------------------------------ catalogues


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


# ------------------------------------------------------------------------------ the text file


def skymodel_text(sources: Iterable[Source]) -> str:
    """The true sky as text, one source per line with every field of :class:`Source` (floats
    as ``repr``, so they read back exactly)."""
    lines = ["# hpcddf.lofar.simulate true sky: flat-spectrum point sources, J2000",
             "# Q + iU = pol_frac I exp(2i (radians(chi0_deg) + rm_rad_m2 lambda^2)), V = circ_frac I; every "
             "Stokes parameter times 1 + flare_amp exp(-(t - flare_t_s)^2 / (2 flare_sigma_s^2)), "
             "t in s after the centre of the first integration",
             "# " + " ".join(SKYMODEL_COLUMNS)]
    lines += [" ".join([s.name] + [repr(float(v)) for v in astuple(s)[1:]]) for s in sources]
    return "\n".join(lines) + "\n"


def read_skymodel(path: Path) -> list[Source]:
    """Parse a sky model written by :func:`skymodel_text`, or an older one with only
    ``name ra_deg dec_deg flux_jy`` (``#`` comments, blank lines ok)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HpcddfError(f"cannot read sky model {path}: {exc.strerror or exc}",
                          "check the path") from None
    sources = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            sources.append(_parse_line(path, lineno, line))
    return sources


def _parse_line(path: Path, lineno: int, line: str) -> Source:
    fields_ = line.split()
    try:
        if len(fields_) not in (len(OLD_SKYMODEL_COLUMNS), len(SKYMODEL_COLUMNS)):
            raise ValueError(f"{len(fields_)} fields")
        return Source(fields_[0], *(float(v) for v in fields_[1:]))
    except ValueError as exc:
        raise HpcddfError(f"{path}:{lineno}: bad sky model line {line!r} ({exc})",
                          f"each line must be: {' '.join(OLD_SKYMODEL_COLUMNS)} "
                          f"[{' '.join(SKYMODEL_COLUMNS[4:])}]") from None
