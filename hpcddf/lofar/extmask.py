"""Extended-emission masks (ddf-pipeline's ``make_extended_mask``), as a node tool.

Run as ``python -m hpcddf.lofar.extmask extended ...`` on a low-resolution image (the bootstrap
mean, then ``image_full_low_im``). DDFacet's automask misses faint extended emission that only
a low-resolution image shows, so islands of that image above ``--rms-thresh`` times the noise
and larger than ``--size-thresh`` pixels become clean masks:

* ``<root>-mask-low.fits`` on the low-resolution image's grid (each kept island grown by
  about one pixel), and
* ``<root>-mask-high.fits`` on the full-resolution template's grid, where every template pixel
  inside a kept island's bounding box takes the low mask's value at the same sky position,
  so the mask can be OR'd into the full-resolution clean masks pixel for pixel.

The noise is the clipped standard deviation of the central 1000x1000 pixels, or with
``--rmsfacet`` one value per DDFacet facet: the mean of a MakeMask noise map inside each facet
polygon of a DDFacet ``.tessel.reg`` file (written as ``<root>-rms-low.fits``). MakeMask is
run by the step as its own command before this tool, so it has its own log and timeout.

``python -m hpcddf.lofar.extmask nonempty`` decides on the node whether a mask may be given
to DDFacet (which refuses an empty external mask): it writes a flag file only when the mask
exists and has a pixel > 0, and the DDF command passes the mask only when the flag exists.

Every output is written to a temporary name in its directory and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

MAX_SIZE = 25000     # islands this large are the field's bright sources' sidelobes, not emission
CENTRAL_BOX = 1000   # the noise box, pixels on a side
CLIP_SIGMA = 5.0
CLIP_ITERS = 20


# ------------------------------------------------------------------------------ FITS grids

@dataclass(frozen=True)
class Grid:
    """A FITS image's header and array shape (DDFacet writes (1, 1, ny, nx))."""

    header: fits.Header
    shape: tuple[int, ...]

    @property
    def plane(self) -> tuple[int, int]:
        return (self.shape[-2], self.shape[-1])

    @property
    def wcs(self) -> WCS:
        return WCS(self.header).celestial


def grid_of(path: str | Path) -> Grid:
    """The grid of a FITS file without reading its pixels (a 20000-pixel template is 1.6 GB)."""
    header = fits.getheader(path)
    shape = tuple(int(header[f"NAXIS{i}"]) for i in range(int(header["NAXIS"]), 0, -1))
    return Grid(header, shape)


def read_plane(path: str | Path) -> tuple[np.ndarray, Grid]:
    """The first image plane (Stokes I, first band) as float64, and the file's grid."""
    with fits.open(path) as hdul:
        data = np.asarray(hdul[0].data)
        header = hdul[0].header.copy()
        plane = np.array(data[(0,) * (data.ndim - 2)], dtype=np.float64)
    return plane, Grid(header, tuple(data.shape))


def write_plane(path: str | Path, plane: np.ndarray, grid: Grid) -> None:
    """A 2-D array as a one-plane image on ``grid``; temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shape = (1,) * (len(grid.shape) - 2) + grid.plane
    fits.PrimaryHDU(data=plane.astype(np.float32).reshape(shape), header=grid.header).writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ noise

def central_rms(image: np.ndarray, box: int = CENTRAL_BOX) -> float:
    """One noise value: the standard deviation of the central box after iterated 5-sigma
    clipping (bright sources would otherwise set the threshold)."""
    from astropy.stats import sigma_clip
    ny, nx = image.shape
    h = box // 2
    sub = image[max(ny // 2 - h, 0):ny // 2 + h, max(nx // 2 - h, 0):nx // 2 + h]
    vals = sub[np.isfinite(sub)]
    kept = sigma_clip(vals, sigma=CLIP_SIGMA, maxiters=CLIP_ITERS, stdfunc="std", masked=False)
    return float(np.std(kept))


def facet_polygons(region_file: str | Path) -> list:
    """The facets of a ds9 region file as sky polygons: ``polygon`` shapes, or DDFacet's
    ``.tessel.reg`` layout (each facet a labelled point followed by its edges as lines)."""
    from regions import LineSkyRegion, PointSkyRegion, PolygonSkyRegion, Regions
    polys, groups = [], []
    for reg in Regions.read(str(region_file), format="ds9"):
        if isinstance(reg, PolygonSkyRegion):
            polys.append(reg)
        elif isinstance(reg, PointSkyRegion):
            groups.append([])
        elif isinstance(reg, LineSkyRegion) and groups:
            groups[-1].append(reg)
    polys += [p for p in map(_polygon_of, groups) if p is not None]
    if not polys:
        raise SystemExit(f"error: {region_file} has no facet polygons")
    return polys


def _polygon_of(edges: list) -> Any:
    """The polygon whose consecutive edges these are (DDFacet writes some of zero length)."""
    from astropy.coordinates import SkyCoord
    from regions import PolygonSkyRegion
    starts = [e.start for e in edges if e.start.separation(e.end).value > 0]
    if len(starts) < 3:
        return None
    return PolygonSkyRegion(vertices=SkyCoord(starts))


def _inside(poly: Any, wcs: WCS, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre falls inside the sky polygon."""
    img = poly.to_pixel(wcs).to_mask(mode="center").to_image(shape)
    return np.zeros(shape, dtype=bool) if img is None else img > 0


def facet_rms(noise: np.ndarray, wcs: WCS, polygons: list) -> np.ndarray:
    """Each facet's pixels get the mean of the noise map inside it: DDFacet calibrates and
    images each facet on its own, so the noise is roughly constant within one. Pixels outside
    every facet keep the noise map's own value."""
    out = noise.copy()
    for poly in polygons:
        inside = _inside(poly, wcs, noise.shape)
        vals = noise[inside & np.isfinite(noise)]
        if vals.size:
            out[inside] = vals.mean()
    return out


# ------------------------------------------------------------------------------ islands

def islands(image: np.ndarray, threshold: np.ndarray | float, size_min: int,
            size_max: int = MAX_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Label the 4-connected islands above the threshold; the labels of those with
    size_min < pixels < size_max."""
    from scipy import ndimage
    with np.errstate(invalid="ignore"):
        above = image > threshold
    labels, _ = ndimage.label(above)  # the default structure is the 4-connected cross
    sizes = np.bincount(labels.ravel())
    kept = np.flatnonzero((sizes > size_min) & (sizes < size_max))
    return labels, kept[kept > 0]


def low_mask(labels: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The kept islands grown by about a pixel: the label-valued image convolved with a 3x3
    box, sums > 1, as ddf-pipeline does (a label-1 island grows only where two of its pixels
    touch, a higher label wherever one does)."""
    from scipy import ndimage
    valued = np.where(np.isin(labels, kept), labels, 0).astype(np.float64)
    return ndimage.convolve(valued, np.ones((3, 3)), mode="constant", cval=0.0) > 1


def high_mask(low: np.ndarray, labels: np.ndarray, kept: np.ndarray, low_wcs: WCS,
              tmpl_wcs: WCS, tmpl_plane: tuple[int, int]) -> np.ndarray:
    """The low mask on the template grid, inside each kept island's (undilated) bounding box."""
    from scipy import ndimage
    high = np.zeros(tmpl_plane, dtype=bool)
    boxes = ndimage.find_objects(labels)
    for k in kept:
        _fill_box(high, low, boxes[k - 1], low_wcs, tmpl_wcs)
    return high


def _template_range(box: tuple[slice, slice], low_wcs: WCS, tmpl_wcs: WCS,
                    tmpl_plane: tuple[int, int]) -> tuple[slice, slice] | None:
    """The template pixels covering a low-grid box (its outer pixel edges, via the sky)."""
    ys, xs = box
    cx, cy = np.meshgrid([xs.start - 0.5, xs.stop - 0.5], [ys.start - 0.5, ys.stop - 0.5])
    ra, dec = low_wcs.all_pix2world(cx.ravel(), cy.ravel(), 0)
    tx, ty = tmpl_wcs.all_world2pix(ra, dec, 0)
    if not (np.all(np.isfinite(tx)) and np.all(np.isfinite(ty))):
        return None
    ny, nx = tmpl_plane
    x0, x1 = max(int(np.floor(tx.min())), 0), min(int(np.ceil(tx.max())), nx - 1)
    y0, y1 = max(int(np.floor(ty.min())), 0), min(int(np.ceil(ty.max())), ny - 1)
    return None if x0 > x1 or y0 > y1 else (slice(y0, y1 + 1), slice(x0, x1 + 1))


def _fill_box(high: np.ndarray, low: np.ndarray, box: tuple[slice, slice], low_wcs: WCS,
              tmpl_wcs: WCS) -> None:
    """Every template pixel whose sky position falls inside the box takes the low mask's
    value there (positions off either grid are skipped, as ddf-pipeline's IndexErrors are)."""
    rng = _template_range(box, low_wcs, tmpl_wcs, high.shape)
    if rng is None:
        return
    yy, xx = np.mgrid[rng]
    yy, xx = yy.ravel(), xx.ravel()
    ra, dec = tmpl_wcs.all_pix2world(xx, yy, 0)
    lx, ly = low_wcs.all_world2pix(ra, dec, 0)
    ok = np.isfinite(lx) & np.isfinite(ly)
    ix, iy = np.full(lx.shape, -1), np.full(ly.shape, -1)
    ix[ok], iy[ok] = np.rint(lx[ok]).astype(int), np.rint(ly[ok]).astype(int)
    ys, xs = box
    inside = ok & (iy >= ys.start) & (iy < ys.stop) & (ix >= xs.start) & (ix < xs.stop)
    high[yy[inside], xx[inside]] |= low[iy[inside], ix[inside]]


# ------------------------------------------------------------------------------ the masks

@dataclass(frozen=True)
class FacetNoise:
    """--rmsfacet: MakeMask's noise map of the image, averaged per facet of a region file."""

    noise_map: str
    region: str


def make_extended_mask(image: str, template: str, root: str, rms_thresh: float, size_thresh: int,
                       max_size: int = MAX_SIZE, facets: FacetNoise | None = None) -> dict[str, Any]:
    """``<root>-mask-low.fits``, ``<root>-mask-high.fits`` (and ``<root>-rms-low.fits`` with
    per-facet noise) from the low-resolution ``image`` and the full-resolution ``template``."""
    data, grid = read_plane(image)
    rms: np.ndarray | float
    if facets:
        noise, _ = read_plane(facets.noise_map)
        rms = facet_rms(noise, grid.wcs, facet_polygons(facets.region))
        write_plane(f"{root}-rms-low.fits", rms, grid)
    else:
        rms = central_rms(data)
    labels, kept = islands(data, rms_thresh * rms, size_thresh, max_size)
    low = low_mask(labels, kept)
    write_plane(f"{root}-mask-low.fits", low, grid)
    tmpl = grid_of(template)
    high = high_mask(low, labels, kept, grid.wcs, tmpl.wcs, tmpl.plane)
    write_plane(f"{root}-mask-high.fits", high, tmpl)
    return {"rms": float(np.nanmedian(rms)), "islands": int(labels.max()), "kept": len(kept),
            "low_pixels": int(low.sum()), "high_pixels": int(high.sum())}


def flag_if_nonempty(mask: str, flag: str) -> int:
    """Write ``flag`` (a JSON record) only when ``mask`` exists and masks a pixel; remove it
    otherwise. DDFacet refuses an empty external mask, so a command that may pass one passes
    it only when the flag exists (the runner's ``when_exists``), decided as the step runs."""
    n = 0
    if Path(mask).exists():
        n = int(np.count_nonzero(fits.getdata(mask) > 0))
    if n:
        _write_json(Path(flag), {"mask": mask, "masked_pixels": n})
    else:
        Path(flag).unlink(missing_ok=True)
    print(f"{mask}: {n} masked pixels" + ("" if n else f" (absent or empty: {flag} removed)"))
    return n


# ------------------------------------------------------------------------------ command line

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.extmask", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("extended", help="<root>-mask-low.fits and <root>-mask-high.fits")
    p.add_argument("--image", required=True, help="the low-resolution restored image")
    p.add_argument("--template", required=True, help="an image on the full-resolution grid")
    p.add_argument("--root", required=True, help="output name prefix (bootstrap, full)")
    p.add_argument("--rms-thresh", type=float, required=True, help="island threshold in units of the noise")
    p.add_argument("--size-thresh", type=int, required=True, help="islands must be larger (pixels)")
    p.add_argument("--max-size", type=int, default=MAX_SIZE, help="and smaller (pixels)")
    p.add_argument("--rmsfacet", action="store_true", help="one noise value per facet of --region")
    p.add_argument("--region", help="the DDFacet .tessel.reg file whose facets --rmsfacet uses")
    p.add_argument("--noise-map", help="MakeMask's noise map (default <image>.noise.fits)")
    p = sub.add_parser("nonempty", help="flag file only if the mask exists and masks a pixel")
    p.add_argument("--mask", required=True)
    p.add_argument("--flag", required=True)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.cmd == "nonempty":
        flag_if_nonempty(a.mask, a.flag)
        return 0
    if a.rmsfacet and not a.region:
        print("error: --rmsfacet needs --region (the facets' .tessel.reg file)", file=sys.stderr)
        return 2
    facets = FacetNoise(a.noise_map or f"{a.image}.noise.fits", a.region) if a.rmsfacet else None
    doc = make_extended_mask(a.image, a.template, a.root, a.rms_thresh, a.size_thresh, a.max_size, facets)
    print(json.dumps({"root": a.root, **doc}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
