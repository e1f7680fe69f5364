"""What a survey release does to each field before it enters the mosaic, from the field's own
products (nothing typed by hand where the field already has it):

* **shifts** (``--apply-shifts``): each facet moved by its astrometric offset, read from the
  offsets step's ``facet-offset.txt`` (the file DDFacet's RestoreAndShift reads) and the image's
  ``*.tessel.reg``; other products' facets take the shift of their calibration direction;
* **blanking** (``--blank-bad-facets``): facets listed in ``Badfacets.txt`` and directions the
  offsets step marked ``Bad`` get no weight; ``--astromap-blank ARCSEC`` zeroes the weight where
  ``astromap.fits`` says the positional error exceeds ARCSEC;
* **noise per facet** (``--facet-noise``): the clipped rms of the apparent image inside each
  facet, instead of one number per field;
* **common beam** (``--common-beam``): inputs restored with different beams are convolved to the
  smallest beam containing them all (radio-beam), or to a given one;
* **flux scale** (``--scale-from-quality``): 1 / the field's LOFAR/catalogue flux ratio from
  its quality step (``quality/quality.json``).

Everything here is done per output block on the input cutout under it (see combine.py): no
step loads a whole input. Facet polygons are straight lines in the image's pixels, as DDFacet's
facets are straight in (l, m).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcddf.errors import HpcddfError
from hpcddf.facets import Facet, read_facet_shifts, read_tessel

QUALITY_JSON = "quality/quality.json"     # written by the field's quality step
FULL_TESSEL = "image_full_ampphase_di_m.NS.tessel.reg"
FULL_INT = "image_full_ampphase_di_m.NS.int.restored.fits"
FULL_APP = "image_full_ampphase_di_m.NS.app.restored.fits"
MAX_NOISE_SAMPLES = 1_000_000             # pixels per facet for its rms (strided read beyond)
ASTROMAP_STEP = 4                          # input pixels between astromap look-ups


class CorrectionError(HpcddfError):
    """A correction asked for cannot be made from the field's products."""


@dataclass(frozen=True)
class FacetCorrection:
    """One facet of one field: its polygon (RA, Dec deg) and what the mosaic does with it."""

    index: int
    direction: int
    polygon: tuple[tuple[float, float], ...]
    shift: tuple[float, float] = (0.0, 0.0)   # arcsec east, north
    blank: bool = False


@dataclass(frozen=True)
class Corrections:
    """Everything applied to one input; empty (the default) means none."""

    facets: tuple[FacetCorrection, ...] = ()
    facet_noise: bool = False
    astromap: str | None = None
    astromap_max: float | None = None          # arcsec
    sources: tuple[str, ...] = ()              # the product files read (for HISTORY)

    @property
    def shifted(self) -> bool:
        return any(f.shift != (0.0, 0.0) for f in self.facets)

    @property
    def blanked(self) -> list[int]:
        return [f.index for f in self.facets if f.blank]

    @property
    def needs_labels(self) -> bool:
        return self.shifted or bool(self.blanked) or self.facet_noise

    def summary(self) -> str:
        """One line for the mosaic's HISTORY."""
        parts = []
        if self.shifted:
            big = max(math.hypot(*f.shift) for f in self.facets)
            parts.append(f"{sum(f.shift != (0.0, 0.0) for f in self.facets)} facets shifted (max {big:.2f}\")")
        if self.blanked:
            parts.append(f"facets {','.join(map(str, self.blanked))} blanked")
        if self.astromap:
            parts.append(f"astromap > {self.astromap_max:g}\" blanked")
        return "; ".join(parts)


@dataclass(frozen=True)
class CorrectionOptions:
    """What ``hpcddf mosaic`` was asked to apply (the same for every field)."""

    apply_shifts: bool = False
    blank_bad_facets: bool = False
    astromap_blank: float | None = None        # arcsec
    facet_noise: bool = False
    scale_from_quality: str | None = None      # a catalogue name, or "any"

    @property
    def any(self) -> bool:
        return self.apply_shifts or self.blank_bad_facets or self.astromap_blank is not None or self.facet_noise


# ---------------------------------------------------------------- reading a field's products

def _need(path: Path, what: str, field_id: str, fix: str) -> Path:
    if not path.is_file():
        raise CorrectionError(f"{what} asked for, but field {field_id} has no {path.name}", fix)
    return path


def _cell_arcsec(image: Path) -> float:
    from astropy.io import fits
    return abs(float(fits.getheader(image)["CDELT2"])) * 3600.0


SHIFTS_FIX = "run the field's offsets step ([offsets] method in its config), or drop --apply-shifts"


def direction_shifts(wd: Path, field_id: str, facets: Sequence[Facet]) -> dict[int, tuple[float, float]]:
    """Shift per calibration direction from the offsets step's facet-offset.txt (one line per
    facet of the full-resolution image, ``facets``, whose labels give each facet's direction)."""
    text = _need(wd / "facet-offset.txt", "--apply-shifts", field_id, SHIFTS_FIX)
    image = wd / FULL_INT if (wd / FULL_INT).is_file() else wd / FULL_APP  # beam_model None: app only
    shifts = read_facet_shifts(str(text), _cell_arcsec(_need(image, "--apply-shifts", field_id,
                                                              "the field has no final image: reduce it first")))
    if len(shifts) < len(facets):
        raise CorrectionError(f"{text} has {len(shifts)} facets, its image {len(facets)}",
                              "rerun the field's offsets step on its final image")
    return {f.direction: shifts[f.index] for f in facets}


def bad_directions(wd: Path, field_id: str) -> tuple[set[int], set[int]]:
    """(facet indices of Badfacets.txt, directions the offsets table marks Bad)."""
    from astropy.table import Table
    facets: set[int] = set()
    listed = wd / "Badfacets.txt"
    if listed.is_file():
        facets = {int(x) for x in listed.read_text(encoding="utf-8").replace(",", " ").split()}
    tables = sorted(glob.glob(str(wd / "*-facet_offsets.fits")))
    if not tables and not listed.is_file():
        raise CorrectionError(f"--blank-bad-facets asked for, but field {field_id} has neither "
                              "Badfacets.txt nor an offsets table",
                              "run the field's offsets step, or write its Badfacets.txt")
    dirs: set[int] = set()
    for t in tables:
        tab = Table.read(t)
        if "Bad" in tab.colnames:
            dirs |= {int(d) for d, bad in zip(tab["Facet_id"], tab["Bad"]) if bad}
    return facets, dirs


def field_corrections(wd: Path, field_id: str, tessel: str, opts: CorrectionOptions) -> Corrections:
    """The corrections of one field's product (``tessel``: that image's facet file)."""
    if not opts.any:
        return Corrections()
    needs_facets = opts.apply_shifts or opts.blank_bad_facets or opts.facet_noise
    facets = read_tessel(str(_need(wd / tessel, "a facet correction", field_id,
                                   "the field's final image has no facet file: reduce it with hpcddf"))) \
        if needs_facets else []
    bad_facets, bad_dirs = bad_directions(wd, field_id) if opts.blank_bad_facets else (set(), set())
    full = facets  # facet-offset.txt and Badfacets.txt name facets of the full image: read it once
    if tessel != FULL_TESSEL and (opts.apply_shifts or bad_facets):
        full = read_tessel(str(_need(wd / FULL_TESSEL, "--apply-shifts", field_id, SHIFTS_FIX))) \
            if opts.apply_shifts or (wd / FULL_TESSEL).is_file() else []
    shifts = direction_shifts(wd, field_id, full) if opts.apply_shifts else {}
    if tessel != FULL_TESSEL and bad_facets:  # blank their directions in this product
        bad_dirs |= {f.direction for f in full if f.index in bad_facets}
        bad_facets = set()
    out = tuple(FacetCorrection(f.index, f.direction, tuple(map(tuple, np.round(f.polygon, 7).tolist())),
                                shifts.get(f.direction, (0.0, 0.0)),
                                f.index in bad_facets or f.direction in bad_dirs) for f in facets)
    astromap = None
    if opts.astromap_blank is not None:
        astromap = str(_need(wd / "astromap.fits", "--astromap-blank", field_id,
                             "run the field's offsets step, or drop --astromap-blank"))
    read = [tessel] * bool(facets) + ["facet-offset.txt"] * opts.apply_shifts + ["astromap.fits"] * bool(astromap)
    return Corrections(out, opts.facet_noise, astromap, opts.astromap_blank, tuple(read))


def quality_scale(wd: Path, field_id: str, catalogue: str) -> float:
    """1 / LOFAR-to-catalogue flux ratio from the field's quality step (``any``: the first
    catalogue the quality step used)."""
    path = _need(wd / QUALITY_JSON, "--scale-from-quality", field_id,
                 "run the field's quality step ([control] quality), or give --scale FIELD=FACTOR")
    cats = json.loads(path.read_text(encoding="utf-8")).get("catalogues", {})
    names = [n for n, c in cats.items() if c.get("used")] if catalogue == "any" else [catalogue]
    entry = cats.get(names[0]) if names else None
    if not entry or not entry.get("used"):
        have = ", ".join(n for n, c in cats.items() if c.get("used")) or "none"
        raise CorrectionError(f"field {field_id}'s quality has no usable flux ratio against {catalogue} "
                              f"(usable: {have})", "name another catalogue, or give --scale FIELD=FACTOR")
    ratio = float(entry["flux_ratio"]["value"])
    if not ratio > 0:
        raise CorrectionError(f"field {field_id}'s flux ratio against {names[0]} is {ratio}", "give --scale FIELD=FACTOR")
    return 1.0 / ratio


def digest(obj: Any) -> str:
    """A short stable hash of corrections/options (the done-marker compares it)."""
    text = json.dumps(obj, sort_keys=True, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- on the node, per cutout

@dataclass
class PixelFacets:
    """One input's facets in its own pixels (built once per process from ``Corrections``)."""

    polygons: list[np.ndarray]                  # (n, 2) x, y
    bboxes: list[tuple[int, int, int, int]]     # y0, y1, x0, x1 (inclusive-exclusive)
    shifts_px: list[tuple[float, float]]        # dy, dx: how far the content moves
    blank: np.ndarray                           # bool per facet
    noise: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per facet, Jy/beam

    @classmethod
    def build(cls, corr: Corrections, wcs: Any) -> PixelFacets:
        from astropy.wcs.utils import proj_plane_pixel_scales
        cx, cy = (float(v) * 3600.0 for v in proj_plane_pixel_scales(wcs))
        polys, boxes, shifts = [], [], []
        for f in corr.facets:
            pg = np.asarray(f.polygon, dtype=float)
            x, y = wcs.all_world2pix(pg[:, 0], pg[:, 1], 0)
            polys.append(np.column_stack([x, y]))
            boxes.append((int(math.floor(y.min())), int(math.ceil(y.max())) + 1,
                          int(math.floor(x.min())), int(math.ceil(x.max())) + 1))
            shifts.append((f.shift[1] / cy, -f.shift[0] / cx))  # east is -x (CDELT1 < 0)
        return cls(polys, boxes, shifts, np.array([f.blank for f in corr.facets], dtype=bool))

    def max_shift_px(self) -> int:
        return int(math.ceil(max((math.hypot(*s) for s in self.shifts_px), default=0.0)))

    def labels(self, cut: tuple[slice, slice]) -> np.ndarray:
        """Facet number (position in ``polygons``) of every cutout pixel, -1 outside all."""
        from matplotlib.path import Path as MplPath
        ys, xs = cut
        out = np.full((ys.stop - ys.start, xs.stop - xs.start), -1, dtype=np.int16)
        for k, (poly, (y0, y1, x0, x1)) in enumerate(zip(self.polygons, self.bboxes)):
            by0, by1 = max(y0, ys.start), min(y1, ys.stop)
            bx0, bx1 = max(x0, xs.start), min(x1, xs.stop)
            if by0 >= by1 or bx0 >= bx1:
                continue
            yy, xx = np.mgrid[by0:by1, bx0:bx1]
            inside = MplPath(poly).contains_points(np.column_stack([xx.ravel(), yy.ravel()]))
            sub = out[by0 - ys.start:by1 - ys.start, bx0 - xs.start:bx1 - xs.start]
            sub[inside.reshape(sub.shape) & (sub < 0)] = k
        return out


def shift_facets(data: np.ndarray, labels: np.ndarray, shifts_px: Sequence[tuple[float, float]]) -> np.ndarray:
    """Each facet's pixels replaced by the image moved by its shift (cubic spline, on the facet's
    bounding box plus a guard only), as DDFacet's RestoreAndShift moves each facet. Used before
    ``exact`` reprojection; the bilinear path folds the shifts into its coordinates instead."""
    from scipy.ndimage import shift as nd_shift
    out = data.copy()
    ny, nx = data.shape
    for k in np.unique(labels[labels >= 0]):
        dy, dx = shifts_px[int(k)]
        if dy == 0.0 and dx == 0.0:
            continue
        ys, xs = np.nonzero(labels == k)
        g = int(math.ceil(max(abs(dy), abs(dx)))) + 3
        y0, y1 = max(0, ys.min() - g), min(ny, ys.max() + g + 1)
        x0, x1 = max(0, xs.min() - g), min(nx, xs.max() + g + 1)
        moved = nd_shift(data[y0:y1, x0:x1], (dy, dx), order=3, mode="nearest")
        mine = labels[y0:y1, x0:x1] == k
        out[y0:y1, x0:x1][mine] = moved[mine]
    return out


def read_astromap(path: str) -> tuple[np.ndarray, Any]:
    """The astromap (small: 20x coarser than its image) and its WCS."""
    from astropy.io import fits
    from astropy.wcs import WCS
    with fits.open(path) as h:
        return np.asarray(h[0].data, dtype=np.float32).reshape(h[0].data.shape[-2:]), WCS(h[0].header).celestial


def astromap_bad(amap: np.ndarray, awcs: Any, limit: float, in_wcs: Any, cut: tuple[slice, slice]) -> np.ndarray:
    """Cutout pixels where the astromap's positional error exceeds ``limit`` (looked up every
    ASTROMAP_STEP pixels: astromap cells are 20 image pixels)."""
    ys, xs = cut
    shape = (ys.stop - ys.start, xs.stop - xs.start)
    yy, xx = np.mgrid[ys.start:ys.stop:ASTROMAP_STEP, xs.start:xs.stop:ASTROMAP_STEP]
    ra, dec = in_wcs.all_pix2world(xx + ASTROMAP_STEP / 2 - 0.5, yy + ASTROMAP_STEP / 2 - 0.5, 0)
    ax, ay = awcs.all_world2pix(ra, dec, 0)
    ix, iy = np.round(ax).astype(int), np.round(ay).astype(int)
    ok = (ix >= 0) & (iy >= 0) & (ix < amap.shape[1]) & (iy < amap.shape[0])
    vals = np.full(ix.shape, np.nan, dtype=np.float32)
    vals[ok] = amap[iy[ok], ix[ok]]
    bad = vals > limit
    return np.repeat(np.repeat(bad, ASTROMAP_STEP, axis=0), ASTROMAP_STEP, axis=1)[:shape[0], :shape[1]]


def facet_noise(app: Any, facets: PixelFacets, fallback: float) -> np.ndarray:
    """The clipped rms of the apparent image inside each facet (strided read: at most
    MAX_NOISE_SAMPLES pixels per facet); ``fallback`` where a facet has too few pixels."""
    from matplotlib.path import Path as MplPath

    from hpcddf.sky import clipped_rms
    out = np.full(len(facets.polygons), fallback, dtype=np.float64)
    ny, nx = app.shape
    for k, (poly, (y0, y1, x0, x1)) in enumerate(zip(facets.polygons, facets.bboxes)):
        y0, y1, x0, x1 = max(0, y0), min(ny, y1), max(0, x0), min(nx, x1)
        if y0 >= y1 or x0 >= x1:
            continue
        step = max(1, int(math.ceil(math.sqrt((y1 - y0) * (x1 - x0) / MAX_NOISE_SAMPLES))))
        sub = np.asarray(app[y0:y1:step, x0:x1:step], dtype=np.float32)
        yy, xx = np.mgrid[y0:y1:step, x0:x1:step]
        inside = MplPath(poly).contains_points(np.column_stack([xx.ravel(), yy.ravel()])).reshape(sub.shape)
        vals = sub[inside & np.isfinite(sub)]
        if vals.size >= 100:
            out[k] = clipped_rms(vals[None, :], box=vals.size)
    return out


# ---------------------------------------------------------------- common resolution

@dataclass(frozen=True)
class Beam:
    """A restoring beam: major and minor FWHM (arcsec), position angle (deg east of north)."""

    bmaj: float
    bmin: float
    bpa: float = 0.0

    @classmethod
    def of(cls, header: Any) -> Beam | None:
        if header.get("BMAJ") is None:
            return None
        bmaj = float(header["BMAJ"]) * 3600.0
        return cls(bmaj, float(header.get("BMIN") or header["BMAJ"]) * 3600.0, float(header.get("BPA") or 0.0))

    def same(self, other: Beam, tol_arcsec: float = 0.036) -> bool:
        """Equal within 1e-5 deg (ddf-pipeline's test), PA ignored for round beams."""
        round_ = abs(self.bmaj - self.bmin) < tol_arcsec and abs(other.bmaj - other.bmin) < tol_arcsec
        return (abs(self.bmaj - other.bmaj) < tol_arcsec and abs(self.bmin - other.bmin) < tol_arcsec
                and (round_ or abs(self.bpa - other.bpa) < 1e-3))

    def radio(self) -> Any:
        import astropy.units as u
        from radio_beam import Beam as RBeam
        return RBeam(major=self.bmaj * u.arcsec, minor=self.bmin * u.arcsec, pa=self.bpa * u.deg)


def common_beam(beams: Sequence[Beam]) -> Beam:
    """The smallest beam containing every one (radio-beam's common beam; the largest of
    identical round beams is itself)."""
    import astropy.units as u
    from radio_beam import Beams
    first = beams[0]
    if all(b.same(first) for b in beams):
        return first
    round_ = [b for b in beams if abs(b.bmaj - b.bmin) < 0.036]
    if len(round_) == len(beams):  # round beams: the largest contains the others
        return max(beams, key=lambda b: b.bmaj)
    cb = Beams(major=[b.bmaj for b in beams] * u.arcsec, minor=[b.bmin for b in beams] * u.arcsec,
               pa=[b.bpa for b in beams] * u.deg).common_beam()
    return Beam(float(cb.major.to_value(u.arcsec)), float(cb.minor.to_value(u.arcsec)), float(cb.pa.to_value(u.deg)))


def convolution_kernel(native: Beam, target: Beam, pixel_arcsec: float) -> tuple[np.ndarray, float] | None:
    """(kernel normalised to sum 1, target/native beam area) taking an image restored with
    ``native`` to ``target``; None when they are the same. A restored image in Jy/beam is
    convolved and multiplied by the area ratio (ddf-pipeline's convolve.py with scale=True)."""
    import astropy.units as u
    if native.same(target):
        return None
    try:
        kb = target.radio().deconvolve(native.radio())
    except Exception:  # noqa: BLE001 - radio-beam's BeamError is a bare Exception
        raise CorrectionError(f"the common beam {target.bmaj:.1f}\"x{target.bmin:.1f}\" does not contain "
                              f"an input's {native.bmaj:.1f}\"x{native.bmin:.1f}\"",
                              "give a larger --common-beam, or auto") from None
    kernel = np.asarray(kb.as_kernel(pixel_arcsec * u.arcsec).array, dtype=np.float32)
    kernel /= kernel.sum()
    ratio = (target.bmaj * target.bmin) / (native.bmaj * native.bmin)
    return kernel, float(ratio)
