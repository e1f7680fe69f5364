"""killMS solutions for the dynamic spectra (``hpcddf.lofar.dynspec``): which files a ``--sols``
string names, and the scalar station gain of every row, channel and stacked direction.

DynSpecMS gets its Jones matrices from DDFacet's ``ClassJones``; this module keeps what that
does for killMS ``.sols.npz`` files and nothing else:

* ``SOLSDIR/<MS>/killMS.<name>.sols.npz`` per MS (``<MS>/killMS.<name>.sols.npz`` without a
  SolsDir; a name ending in ``.npz`` is a path). ``"[A,B]"`` names two sets whose Jones
  matrices are multiplied (ddf-pipeline's fast x very slow solutions).
* A row takes the solution interval that holds its TIME (DDFacet's time mapping; the first or
  last interval outside them), a channel the frequency domain with the nearest centre, and a
  direction the solution direction nearest in (l, m) about the MS's own phase centre.
* Only the (0,0) element is used: DynSpecMS applies one scalar gain to all four correlations.
* ``--CutGainsMinMax a,b``: a merged gain with amplitude outside [a, b] becomes 0, which gives
  its samples zero weight. DynSpecMS compares the stored complex values; the amplitude is what
  such a cut is meant to test, and what is done here.
* ``MaskedSols`` frequency domains are replaced by unit gains, as DDFacet does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcddf.lofar.dynspec_ms import DynSpecError, MSInfo
from hpcddf.lofar.dynspec_targets import radec_to_lm


def parse_sols(text: str | None) -> list[str]:
    """``"[A,B]"``, ``"A,B"`` or ``"A"`` -> the solution names; empty -> no solutions."""
    if not text:
        return []
    return [s.strip() for s in text.strip().strip("[]").split(",") if s.strip()]


def sols_path(ms: Path, name: str, sols_dir: str | None) -> Path:
    """Where DDFacet looks for solution set ``name`` of ``ms``."""
    if name.endswith(".npz"):
        return Path(name)
    base = Path(sols_dir) / ms.name if sols_dir else ms
    return base / f"killMS.{name}.sols.npz"


@dataclass(frozen=True)
class SolSet:
    """One solution file, reduced to scalar gains."""

    path: Path
    t0: np.ndarray  # (nt,) interval starts, MJD s
    g: np.ndarray  # (nt, nf, nant, ndir) complex: the (0,0) element
    fcentre: np.ndarray  # (nf,) frequency-domain centres, Hz
    ra: np.ndarray  # (ndir,) radians
    dec: np.ndarray


def load_solset(path: Path) -> SolSet:
    """Read a killMS ``.sols.npz`` (Sols: t0, t1, G (nt, nf, nant, ndir, 2, 2); ClusterCat or
    SkyModel: ra, dec; FreqDomains (nf, 2))."""
    try:
        with np.load(path, allow_pickle=False) as f:
            sols, cat = f["Sols"], f["ClusterCat" if "ClusterCat" in f.files else "SkyModel"]
            domains = f["FreqDomains"] if "FreqDomains" in f.files else None
            masked = f["MaskedSols"] if "MaskedSols" in f.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise DynSpecError(f"{path}: not a readable killMS solution file ({exc})") from None
    g = np.array(sols["G"][..., 0, 0], dtype=np.complex128)
    if masked is not None:
        g[:, np.asarray(masked[0, :, 0, 0, 0, 0], dtype=bool)] = 1.0
    fcentre = domains.mean(axis=1) if domains is not None else np.zeros(g.shape[1])
    return SolSet(path=path, t0=np.asarray(sols["t0"], dtype=float), g=g, fcentre=fcentre,
                  ra=np.asarray(cat["ra"], dtype=float), dec=np.asarray(cat["dec"], dtype=float))


@dataclass(frozen=True)
class Gains:
    """The gains of one MS's rows for the stacked directions (the product over the sets)."""

    sets: tuple[SolSet, ...]
    chan: tuple[np.ndarray, ...]  # per set: the frequency domain of each (ascending) channel
    dirs: tuple[np.ndarray, ...]  # per set: the solution direction of each stacked direction
    cut: tuple[float, float] | None

    def time_index(self, times: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.clip(np.searchsorted(s.t0, times, side="right") - 1, 0, len(s.t0) - 1)
                     for s in self.sets)

    def groups(self) -> dict[tuple[int, ...], list[int]]:
        """The stacked directions by the solution directions they take (one per set): a
        group shares its gains, so they are computed once for all its members."""
        out: dict[tuple[int, ...], list[int]] = {}
        for d, key in enumerate(zip(*(dd.tolist() for dd in self.dirs))):
            out.setdefault(tuple(key), []).append(d)
        return out

    def station(self, tidx: Sequence[np.ndarray], ant: np.ndarray, key: tuple[int, ...]) -> np.ndarray:
        """(nrow, nchan) gain of station ``ant`` of each row towards solution directions
        ``key`` (one per set), the sets multiplied and the amplitude cut applied."""
        g = np.ones((len(ant), len(self.chan[0])), dtype=np.complex128)
        for s, ti, ch, sd in zip(self.sets, tidx, self.chan, key):
            g = g * s.g[ti[:, None], ch[None, :], ant[:, None], sd]
        if self.cut is not None:
            amp = np.abs(g)
            g[(amp < self.cut[0]) | (amp > self.cut[1])] = 0
        return g


def gains_for(info: MSInfo, names: Sequence[str], sols_dir: str | None, ra: np.ndarray,
              dec: np.ndarray, cut: tuple[float, float] | None) -> Gains | None:
    """Load the solutions of one MS for directions (ra, dec); None when there are none."""
    if not names:
        return None
    sets = tuple(load_solset(sols_path(info.path, n, sols_dir)) for n in names)
    for s in sets:
        if s.g.shape[2] != info.nant:
            raise DynSpecError(f"{s.path}: {s.g.shape[2]} stations, {info.path} has {info.nant}")
    chan = tuple(np.argmin(np.abs(info.freqs[:, None] - s.fcentre[None, :]), axis=1) for s in sets)
    lt, mt = radec_to_lm(ra, dec, info.ra0, info.dec0)
    dirs = []
    for s in sets:
        ls, ms = radec_to_lm(s.ra, s.dec, info.ra0, info.dec0)
        dirs.append(np.argmin((lt[:, None] - ls[None]) ** 2 + (mt[:, None] - ms[None]) ** 2, axis=1))
    return Gains(sets=sets, chan=chan, dirs=tuple(dirs), cut=cut)


def missing_sols(mss: Sequence[Path], names: Sequence[str], sols_dir: str | None) -> list[Path]:
    """The solution files that do not exist (checked before hours of stacking start)."""
    return [p for ms in mss for p in (sols_path(ms, n, sols_dir) for n in names) if not p.exists()]
