"""DDFacet's facets as its region files describe them: shared by the offsets step (which
measures an astrometric offset per facet) and the mosaic (which applies it, blanks bad facets and
measures noise per facet), so the one reading of ``*.tessel.reg`` serves both.

A facet is labelled ``F<i>_S<j>``: facet ``i`` of the image, calibrated in direction ``j``.
``facet-offset.txt`` (DDFacet's ``--Output-ShiftFacetsFile``) has one line per facet ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Facet:
    """One DDFacet facet: its index, its calibration direction and its polygon (RA, Dec deg)."""

    index: int
    direction: int
    polygon: np.ndarray   # (n, 2)


def read_tessel(path: str, centre: tuple[float, float] | None = None) -> list[Facet]:
    """Facets of a DDFacet ``*.tessel.reg``: closed chains of ``line(...)`` segments are the
    polygons; each is labelled by the ``point(...) # text={[F<i>_S<j>]}`` that lies inside it
    (DDFacet does not write a polygon next to its own label)."""
    import re
    label = re.compile(r"text=\{\[F(\d+)_S(\d+)\]\}")
    coords = re.compile(r"\(([^)]*)\)")
    points: list[tuple[int, int, float, float]] = []
    polygons: list[list[tuple[float, float]]] = []
    chain: list[tuple[float, float]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            c = coords.search(line)
            if line.startswith("point(") and c and (m := label.search(line)):
                ra, dec = (float(x) for x in c.group(1).split(",")[:2])
                points.append((int(m.group(1)), int(m.group(2)), ra, dec))
            elif line.startswith("line(") and c:
                ra1, dec1, ra2, dec2 = (float(x) for x in c.group(1).split(","))
                if chain and (ra1, dec1) != chain[-1]:
                    chain = []  # a segment that does not continue the chain starts a new one
                if not chain:
                    chain = [(ra1, dec1)]
                    polygons.append(chain)
                chain.append((ra2, dec2))
                if chain[-1] == chain[0]:
                    chain.pop()
                    chain = []
    if centre is None:
        centre = (float(np.mean([p[2] for p in points])), float(np.mean([p[3] for p in points])))
    facets = []
    from matplotlib.path import Path as MplPath
    label_xy = tangent(np.array([p[2] for p in points]), np.array([p[3] for p in points]), centre) \
        if points else np.zeros((0, 2))  # once for all labels: a SkyCoord per point and polygon was slow
    for poly in polygons:
        if len(poly) < 3:
            continue
        pg = np.array(poly)
        inside = np.flatnonzero(MplPath(tangent(pg[:, 0], pg[:, 1], centre)).contains_points(label_xy))
        if inside.size:
            facets.append(Facet(points[inside[0]][0], points[inside[0]][1], pg))
    return sorted(facets, key=lambda f: f.index)


def tangent(ra: np.ndarray, dec: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """Offsets (deg, east and north) about the image centre, as DDFacet's facets are flat there."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord
    c = SkyCoord(centre[0] * u.deg, centre[1] * u.deg)
    dra, ddec = c.spherical_offsets_to(SkyCoord(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg))
    return np.column_stack([dra.deg, ddec.deg])


def facet_of(ra: np.ndarray, dec: np.ndarray, facets: Sequence[Facet],
             centre: tuple[float, float]) -> np.ndarray:
    """The facet index of each position (-1 outside every facet)."""
    from matplotlib.path import Path as MplPath
    xy = tangent(np.atleast_1d(ra), np.atleast_1d(dec), centre)
    out = np.full(len(xy), -1, dtype=int)
    for f in facets:
        inside = MplPath(tangent(f.polygon[:, 0], f.polygon[:, 1], centre)).contains_points(xy)
        out[inside & (out < 0)] = f.index
    return out


def read_facet_coords(path: str) -> np.ndarray:
    """(ra_rad, dec_rad) of every facet centre from DDFacet's ``*.facetCoord.txt``."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 4:
                rows.append((float(parts[2]), float(parts[3])))
    return np.array(rows)




def read_facet_shifts(path: str, cell_arcsec: float) -> list[tuple[float, float]]:
    """Per facet of ``facet-offset.txt`` (``ra_rad dec_rad dl dm``, pixels): the shift DDFacet's
    RestoreAndShift applies, as (east, north) arcsec. DDFacet 0.9.1 moves a facet east by dl and
    north by -dm pixels (measured on its output: tests/science/test_offsets_reduction.py)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 4:
                out.append((float(parts[2]) * cell_arcsec, -float(parts[3]) * cell_arcsec))
    return out


def write_tessel(path: str, facets: Sequence[Facet], labels: Sequence[tuple[float, float]]) -> None:
    """A ``*.tessel.reg`` as DDFacet writes it: per facet a labelled point (``labels``: a position
    inside it) and its polygon as a closed chain of line segments (for simulated fields)."""
    from hpcddf.engine.atomic import write_text_atomic
    lines = ["# Region file format: DS9 version 4.1", "fk5"]
    for f, (ra, dec) in zip(facets, labels, strict=True):
        lines.append(f"point({ra:.6f},{dec:.6f}) # text={{[F{f.index}_S{f.direction}]}}")
        pg = np.asarray(f.polygon)
        for a, b in zip(pg, np.roll(pg, -1, axis=0)):
            lines.append(f"line({a[0]:.6f},{a[1]:.6f},{b[0]:.6f},{b[1]:.6f}) # line=0 0")
    write_text_atomic(path, "\n".join(lines) + "\n")
