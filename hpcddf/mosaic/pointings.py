"""A survey's pointings and, for each mosaic centre, the neighbouring pointings it is built from.

The table is the user's (``--pointings``): CSV or FITS with an id, RA and Dec in degrees, read
with astropy. Separations are astropy's great-circle separations.

Neighbours follow ddf-pipeline's rule: the centre itself, its 6 nearest pointings, and any other
within 1.1 x the separation of the 6th nearest; excluded pointings then drop out (they are not
replaced). ddf-pipeline's loop only looked at the 7th..19th nearest and compared strictly, so a
7th pointing at exactly 1.1 x was left out; here every pointing within 1.1 x (inclusive) is in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpcddf.errors import HpcddfError

ID_COLUMNS = ("id", "field", "field_id", "pointing", "name")
RA_COLUMNS = ("ra", "ra_deg", "raj2000", "ra_j2000")
DEC_COLUMNS = ("dec", "dec_deg", "decj2000", "dec_j2000", "de")
N_NEAREST = 6
WITHIN_FACTOR = 1.1


class PointingsError(HpcddfError):
    """The pointings table cannot be used."""


@dataclass(frozen=True)
class Pointing:
    id: str
    ra: float   # degrees
    dec: float  # degrees


@dataclass(frozen=True)
class Neighbourhood:
    """The pointings one mosaic is made of, with their separations from its centre (deg)."""

    centre: Pointing
    members: tuple[Pointing, ...]
    separations: tuple[float, ...]

    @property
    def max_separation(self) -> float:
        return max(self.separations)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.members]


def _column(names: Sequence[str], wanted: Sequence[str], what: str, path: Path) -> str:
    lower = {n.lower(): n for n in names}
    for w in wanted:
        if w in lower:
            return lower[w]
    raise PointingsError(f"pointings table {path} has no {what} column (columns: {', '.join(names)})",
                         f"name one of its columns {' or '.join(wanted[:3])}")


def read_pointings(path: str | Path) -> list[Pointing]:
    """The pointings of a CSV or FITS table; a clear error for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise PointingsError(f"pointings table {path} does not exist",
                             "give a CSV or FITS file with id, ra, dec columns to --pointings")
    from astropy.table import Table
    fmt = "ascii.csv" if path.suffix.lower() in (".csv", ".txt") else None
    try:
        table = Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as exc:  # astropy raises many kinds for unreadable tables
        raise PointingsError(f"cannot read pointings table {path}: {str(exc).splitlines()[0][:200]}",
                             "give a CSV (with a header line) or a FITS table") from None
    cid, cra, cdec = (_column(table.colnames, c, w, path)
                      for c, w in ((ID_COLUMNS, "id"), (RA_COLUMNS, "RA"), (DEC_COLUMNS, "Dec")))
    out: list[Pointing] = []
    for row in table:
        pid = str(row[cid]).strip()
        try:
            ra, dec = float(row[cra]), float(row[cdec])
        except (TypeError, ValueError):
            raise PointingsError(f"pointing {pid} in {path}: RA/Dec {row[cra]!r}, {row[cdec]!r} "
                                 "are not numbers", "give RA and Dec in decimal degrees") from None
        if not (0.0 <= ra < 360.0 + 1e-9 and -90.0 <= dec <= 90.0):
            raise PointingsError(f"pointing {pid} in {path}: RA/Dec {ra}, {dec} out of range",
                                 "give RA in [0, 360) and Dec in [-90, 90] degrees")
        out.append(Pointing(pid, ra % 360.0, dec))
    seen: set[str] = set()
    for p in out:
        if p.id in seen:
            raise PointingsError(f"pointing {p.id} appears twice in {path}", "make the ids unique")
        seen.add(p.id)
    if not out:
        raise PointingsError(f"pointings table {path} is empty", "give at least one pointing")
    return out


def separations(centre: Pointing, pointings: Sequence[Pointing]) -> list[float]:
    """Great-circle separations (deg) of every pointing from ``centre`` (astropy's Vincenty
    formula on plain arrays: a survey tick asks this for hundreds of centres over thousands of
    pointings, where building SkyCoord objects each time cost 1.6 ms a call)."""
    import numpy as np
    from astropy.coordinates import angular_separation
    ra = np.radians([p.ra for p in pointings])
    dec = np.radians([p.dec for p in pointings])
    seps = angular_separation(np.radians(centre.ra), np.radians(centre.dec), ra, dec)
    return np.degrees(seps).tolist()


def neighbourhood(centre: Pointing, pointings: Sequence[Pointing],
                  exclude: Iterable[str] = ()) -> Neighbourhood:
    """The centre, its 6 nearest and any within 1.1 x the 6th-nearest separation, minus ``exclude``."""
    seps = separations(centre, pointings)
    # the 7th-nearest (the centre itself is the nearest) sets the limit; only those within it
    # are sorted, by separation then id
    limit = sorted(seps)[N_NEAREST] * WITHIN_FACTOR if len(seps) > N_NEAREST else math.inf
    chosen = sorted((i for i in range(len(pointings)) if seps[i] <= limit),
                    key=lambda i: (seps[i], pointings[i].id))
    skip = set(exclude)
    chosen = [i for i in chosen if pointings[i].id not in skip]
    return Neighbourhood(centre, tuple(pointings[i] for i in chosen), tuple(seps[i] for i in chosen))


def select_centres(pointings: Sequence[Pointing], ids: Sequence[str] = (),
                   region: tuple[float, float, float] | None = None,
                   all_: bool = False) -> list[Pointing]:
    """The mosaic centres asked for: given ids, those within a region (RA, Dec, radius deg), or all."""
    by_id = {p.id: p for p in pointings}
    if sum(bool(x) for x in (ids, region, all_)) != 1:
        raise PointingsError("say which mosaics to make", "give field ids, --region RA,DEC,RADIUS or --all")
    if ids:
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise PointingsError(f"field {unknown[0]} is not in the pointings table",
                                 "check the id, or add the pointing to the table")
        return [by_id[i] for i in ids]
    if region:
        ra, dec, radius = region
        seps = separations(Pointing("region", ra, dec), pointings)
        chosen = [p for p, s in zip(pointings, seps) if s <= radius]
        if not chosen:
            raise PointingsError(f"no pointing within {radius} deg of RA {ra}, Dec {dec}",
                                 "widen the radius or check the coordinates (degrees)")
        return chosen
    return list(pointings)


def parse_region(text: str) -> tuple[float, float, float]:
    """``RA,DEC,RADIUS`` in degrees."""
    try:
        ra, dec, radius = (float(x) for x in text.split(","))
    except ValueError:
        raise PointingsError(f"region {text!r} is not RA,DEC,RADIUS",
                             "give three numbers in degrees, e.g. --region 180.5,45,3") from None
    if radius <= 0 or not -90 <= dec <= 90:
        raise PointingsError(f"region {text!r} is impossible", "Dec in [-90, 90], radius > 0 degrees")
    return ra % 360.0, dec, radius
