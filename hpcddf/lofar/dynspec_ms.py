"""The Measurement-Set side of the dynamic spectra (``hpcddf.lofar.dynspec``): what each MS
holds (phase centre, channels, times, correlations), the grouping of MSs into observing
periods, the common time-frequency grid of a period, and one chunk of rows read as residual
visibilities with their weights.

Everything is read with python-casacore, one MS and one chunk of rows at a time, so the
memory a run needs is the output grid plus one chunk, whatever the size of the MSs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcddf.errors import HpcddfError

# casacore Stokes::StokesTypes of the two linear layouts DynSpecMS accepts
LINEAR4 = (9, 10, 11, 12)  # XX XY YX YY
LINEAR2 = (9, 12)  # XX YY
# Budget for one chunk of rows: the data, model, flags and the per-direction products are a
# handful of (rows x channels x 4) complex128 arrays, so this bounds the working memory.
CHUNK_BYTES = 256 * 2**20
BYTES_PER_SAMPLE = 16 * 8  # one (row, channel, correlation): ~8 complex128 arrays alive at once


class DynSpecError(HpcddfError):
    """Inputs the dynamic spectra cannot be made from (the message says which and why)."""


def tables() -> Any:
    try:
        from casacore import tables as ct
    except ImportError as exc:
        raise DynSpecError(f"python-casacore is not installed ({exc})",
                           "install the science stack: pip install 'hpcddf[science]'") from None
    return ct


@dataclass(frozen=True)
class MSInfo:
    """The facts of one MS the grid, the phasing and the headers need (radians, Hz, MJD s)."""

    path: Path
    ra0: float
    dec0: float
    freqs: np.ndarray  # channel centres, ascending
    flipped: bool  # the MS stores its channels in descending order
    width: float
    tmin: float  # first and last TIME (integration centres)
    tmax: float
    interval: float
    corr: tuple[int, ...]
    telescope: str
    nant: int
    nrow: int

    @property
    def name(self) -> str:
        return self.path.name


def _cell(ct: Any, path: Path, sub: str, col: str) -> Any:
    with ct.table(f"{path}/{sub}", ack=False) as t:
        if t.nrows() == 0:
            raise DynSpecError(f"{path}: subtable {sub} is empty")
        return t.getcell(col, 0)


def read_ms_info(path: Path) -> MSInfo:
    """Read one MS's phase centre, channels, time range and layout (spectral window 0:
    LOFAR MSs have one)."""
    ct = tables()
    if not (path / "table.dat").exists():
        raise DynSpecError(f"{path} is not a Measurement Set")
    freqs = np.asarray(_cell(ct, path, "SPECTRAL_WINDOW", "CHAN_FREQ"), dtype=float)
    width = float(np.abs(_cell(ct, path, "SPECTRAL_WINDOW", "CHAN_WIDTH")).mean())
    ra0, dec0 = np.asarray(_cell(ct, path, "FIELD", "PHASE_DIR"), dtype=float).reshape(-1, 2)[0]
    corr = tuple(int(c) for c in _cell(ct, path, "POLARIZATION", "CORR_TYPE"))
    telescope = str(_cell(ct, path, "OBSERVATION", "TELESCOPE_NAME"))
    with ct.table(f"{path}/ANTENNA", ack=False) as ant:
        nant = ant.nrows()
    with ct.table(str(path), ack=False) as t:
        times = t.getcol("TIME")
        interval = float(t.getcell("INTERVAL", 0))
        nrow = t.nrows()
    flipped = bool(len(freqs) > 1 and freqs[0] > freqs[-1])
    return MSInfo(path=path, ra0=float(ra0), dec0=float(dec0), freqs=np.sort(freqs), flipped=flipped,
                  width=width, tmin=float(times.min()), tmax=float(times.max()), interval=interval,
                  corr=corr, telescope=telescope, nant=nant, nrow=nrow)


def read_ms_list(path: Path) -> list[Path]:
    """The MSs of ``--ms``: an MS itself, or a text list of them (one a line, as
    ``mslist-<obsid>.txt``), relative names taken from the current directory."""
    if path.is_dir():
        return [path]
    if not path.is_file():
        raise DynSpecError(f"--ms {path}: no such MS or MS list")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not names:
        raise DynSpecError(f"--ms {path}: the list is empty")
    return [Path(n) for n in names]


# ------------------------------------------------------------------------------ periods


def group_periods(infos: Sequence[MSInfo], split: bool) -> list[list[MSInfo]]:
    """The MSs grouped by their (first, last) TIME, in time order (``--SplitNonContiguous``):
    each period is stacked and written on its own; without the split, one group."""
    if not split:
        return [list(infos)]
    groups: dict[tuple[float, float], list[MSInfo]] = {}
    for info in infos:
        groups.setdefault((round(info.tmin, 3), round(info.tmax, 3)), []).append(info)
    return [groups[k] for k in sorted(groups)]


def _separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    from astropy.coordinates import SkyCoord
    a = SkyCoord(ra1, dec1, unit="rad")
    return float(a.separation(SkyCoord(ra2, dec2, unit="rad")).arcsec)


def mean_centre(infos: Sequence[MSInfo]) -> tuple[float, float]:
    """The mean phase centre (unit-vector mean, so RA wrapping at 0 is harmless)."""
    from astropy.coordinates import CartesianRepresentation, SkyCoord, UnitSphericalRepresentation
    xyz = SkyCoord([i.ra0 for i in infos], [i.dec0 for i in infos], unit="rad").cartesian.xyz.value
    mean = CartesianRepresentation(*xyz.mean(axis=1)).represent_as(UnitSphericalRepresentation)
    return float(mean.lon.rad), float(mean.lat.rad)


def check_period(infos: Sequence[MSInfo], tolerance_arcsec: float) -> tuple[float, float]:
    """Refuse MSs that cannot share one output grid (as DynSpecMS does): phase centres more
    than ``tolerance_arcsec`` from their mean, different channel widths, non-linear or
    partial correlations. Returns the mean phase centre (radians)."""
    ra0, dec0 = mean_centre(infos)
    for info in infos:
        sep = _separation_arcsec(info.ra0, info.dec0, ra0, dec0)
        if sep > tolerance_arcsec:
            raise DynSpecError(f"{info.path}: phase centre {sep:.3g}\" from the mean of the MSs "
                               f"(--tolerance {tolerance_arcsec}\")", "give MSs of one pointing")
        if info.corr not in (LINEAR4, LINEAR2):
            raise DynSpecError(f"{info.path}: correlations {info.corr} are not XX,XY,YX,YY or XX,YY")
    widths = {round(i.width, 3) for i in infos}
    if len(widths) > 1:
        raise DynSpecError(f"the MSs have different channel widths {sorted(widths)} Hz",
                           "average them to one width first")
    return ra0, dec0


# ------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Grid:
    """The output pixels of one period: native integrations x native channels."""

    t0: float  # start of the first integration, MJD s
    dt: float
    ntime: int
    f0: float  # centre of the lowest channel, Hz
    df: float
    nchan: int
    ra0: float  # the period's mean phase centre, radians
    dec0: float

    def time_index(self, times: np.ndarray) -> np.ndarray:
        """The pixel of each TIME (integration centres fall mid-pixel, so rounding is safe)."""
        return np.clip(np.floor((times - self.t0) / self.dt).astype(np.int64), 0, self.ntime - 1)

    def chan_offset(self, info: MSInfo) -> int:
        return int(round((info.freqs[0] - self.f0) / self.df))

    @property
    def t1(self) -> float:
        return self.t0 + self.ntime * self.dt

    @property
    def fmax(self) -> float:
        return self.f0 + (self.nchan - 1) * self.df


def make_grid(infos: Sequence[MSInfo], centre: tuple[float, float]) -> Grid:
    """Time from the earliest integration start in steps of INTERVAL; frequency from the lowest
    channel in steps of the channel width (gaps between subbands stay as empty pixels)."""
    dt = infos[0].interval
    t0 = min(i.tmin for i in infos) - dt / 2
    t1 = max(i.tmax for i in infos) + dt / 2
    f0 = min(float(i.freqs[0]) for i in infos)
    fmax = max(float(i.freqs[-1]) for i in infos)
    df = infos[0].width
    return Grid(t0=t0, dt=dt, ntime=max(1, math.ceil((t1 - t0) / dt - 1e-6)), f0=f0, df=df,
                nchan=int(round((fmax - f0) / df)) + 1, ra0=centre[0], dec0=centre[1])


# ------------------------------------------------------------------------------ chunks


@dataclass(frozen=True)
class Chunk:
    """Rows of one MS, ready to stack: residual visibilities in XX,XY,YX,YY order (zero where
    flagged) and their weights (zero where flagged or outside the uv range)."""

    vis: np.ndarray  # (nrow, nchan, 4) complex128
    weight: np.ndarray  # (nrow, nchan, 4) float64
    uvw: np.ndarray  # (nrow, 3) metres
    a1: np.ndarray
    a2: np.ndarray
    time: np.ndarray


@dataclass(frozen=True)
class Columns:
    data: str
    model: str | None  # None: nothing subtracted
    weight: str | None  # None: unit weights
    uv_km: tuple[float, float]


def chunk_rows(nchan: int, budget: int = CHUNK_BYTES) -> int:
    return max(1, budget // (nchan * 4 * BYTES_PER_SAMPLE))


def _to_linear4(a: np.ndarray, corr: tuple[int, ...], fill: Any) -> np.ndarray:
    if corr == LINEAR4:
        return a
    out = np.full(a.shape[:2] + (4,), fill, dtype=a.dtype)
    out[..., 0], out[..., 3] = a[..., 0], a[..., 1]
    return out


def _weights(t: Any, col: str | None, start: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """``--WeightCol`` averaged over polarisations (DynSpecMS's rule), else ones."""
    if col is None:
        return np.ones(shape[:2])
    w = np.asarray(t.getcol(col, start, n), dtype=float)
    if w.ndim == 3:
        return w.mean(axis=2)
    if w.ndim == 2 and w.shape[1] == shape[1] and col != "WEIGHT":
        return w  # (row, channel), e.g. IMAGING_WEIGHT
    return np.broadcast_to(w.reshape(len(w), -1).mean(axis=1)[:, None], shape[:2])


def read_chunk(t: Any, info: MSInfo, cols: Columns, start: int, n: int) -> Chunk:
    """Rows ``start .. start+n`` of an open MS: data minus model, flags and the uv cut on the
    3-D |uvw| (km) folded into the weights, channels put in ascending order."""
    vis = t.getcol(cols.data, start, n).astype(np.complex128)
    if cols.model:
        vis -= t.getcol(cols.model, start, n)
    flag = t.getcol("FLAG", start, n) | t.getcol("FLAG_ROW", start, n)[:, None, None]
    uvw = t.getcol("UVW", start, n)
    km = np.sqrt((uvw ** 2).sum(axis=1)) / 1e3
    flag |= ((km < cols.uv_km[0]) | (km > cols.uv_km[1]))[:, None, None]
    flag |= ~np.isfinite(vis)
    w = _weights(t, cols.weight, start, n, vis.shape)[:, :, None] * ~flag
    vis[flag] = 0
    if info.flipped:
        vis, w = vis[:, ::-1], w[:, ::-1]
    return Chunk(vis=_to_linear4(vis, info.corr, 0), weight=_to_linear4(w, info.corr, 0.0), uvw=uvw,
                 a1=t.getcol("ANTENNA1", start, n), a2=t.getcol("ANTENNA2", start, n),
                 time=t.getcol("TIME", start, n))


def check_columns(mss: Sequence[Path], cols: Columns) -> None:
    """Refuse at the start, not after hours of stacking, an MS without a named column."""
    ct = tables()
    for ms in mss:
        with ct.table(str(ms), ack=False) as t:
            missing = [c for c in (cols.data, cols.model, cols.weight) if c and c not in t.colnames()]
        if missing:
            raise DynSpecError(f"{ms} has no column {', '.join(missing)}")


def iter_chunks(info: MSInfo, cols: Columns, rows: int | None = None) -> Iterator[Chunk]:
    """The MS in chunks of rows (``rows``, or what fits CHUNK_BYTES), read-only."""
    ct = tables()
    step = rows or chunk_rows(len(info.freqs))
    with ct.table(str(info.path), ack=False) as t:
        for name in [c for c in (cols.data, cols.model, cols.weight) if c]:
            if name not in t.colnames():
                raise DynSpecError(f"{info.path} has no column {name}")
        for start in range(0, t.nrows(), step):
            yield read_chunk(t, info, cols, start, min(step, t.nrows() - start))
