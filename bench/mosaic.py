#!/usr/bin/env python3
"""A 7-field mosaic: hpcddf's block-wise, footprint-only, parallel mosaic vs. the reference
approach (ddf-pipeline's mosaic.py: each whole field read, its beam filtered over the whole
image, reprojected with reproject_interp, serially, then combined).

hpcddf's mosaic is the circle of radius NAXIS1/2 in the square output grid (blocks outside it
are never computed, pixels outside it blanked); ddf-pipeline's reprojects onto the whole square,
~27 % more pixels. So that the speed-up is like with like, the baseline here reprojects onto the
circle's pixels only (row strips of the output covering it, blanked outside it as hpcddf does:
the same pixels, the rest of the reference approach unchanged); the whole-square reference is
timed too and shown beside it (speedup_square, square_s, square_peak_ratio: what speedup,
baseline_s and baseline_peak_ratio meant before).

Release corrections (--corrections, the default; --no-corrections: the plain mosaic). Every
field is cut into --facets x --facets (6 x 6) square DDFacet facets, each with an astrometric
offset of 0-3" in a random direction (its sources drawn displaced, facet-offset.txt and
*.tessel.reg written as the offsets step and DDFacet leave them), one facet per field (under
the mosaic) listed in Badfacets.txt, and field P003 restored with a 25" beam instead of 20", so
the other six are convolved to the common beam (25"). hpcddf applies the shifts, the blanking
and the convolution per output block on the input cutout (field_corrections with
--apply-shifts --blank-bad-facets, common beam auto). The baseline does them as ddf-pipeline's
mosaic.py does (--convolve, --apply_shift, --use_badfacet), serially and whole-field: each
whole int image convolved to the common beam (FFT, times the beam area ratio; noise measured as
hpcddf measures it, on the convolved centre of the app image; the app image itself is not
convolved, ddf-pipeline's --convolve also convolves it), then every good facet reprojected on
its own (reproj_inner: the facet's bounding box plus a 20 px guard, CRPIX moved by the shift,
reproject_interp, zeroed outside the facet polygon in the output grid; int and weight alike)
and summed; bad facets skipped. ddf-pipeline runs each facet in a subprocess; this serial
reference runs them one after the other in-process. Facet tables (polygons, shifts, bad list)
are read once before the timing for both sides (field_corrections); the baseline uses the same
table. Not as the reference, and in the baseline's favour: each facet is reprojected onto the
circle's strips clipped to the facet's bounding box in the output, not onto the whole output
(the reference's way costs ~2 s per facet at the default size: ~245 good facets x int and weight,
~17 min a run); the square variant clips to the bounding boxes too, so it differs from the
circle only by the boxes' pixels outside the circle. Both resample bilinearly at each facet's
shifted position (hpcddf in one pass per block with the shift folded into the coordinates, from
a coarse-grid pixel map; the reference facet by facet through reproject_interp), so the two
mosaics differ mostly at facet edges (which facet a pixel next to the border takes) and by the
order of convolution and resampling; the bench reports the median |difference| / noise, the difference away from facet edges
and off sources, and both mosaics' source positions against the truth.

Same inputs for every run: a LoTSS-like hexagonal survey (2.58 deg spacing, Gaussian primary beam
of 3.8 deg FWHM, low-resolution product: 4.5" cells, 20" beam; every field imaged out to 2.6 deg),
written once to a cache directory (one for each of the plain and the corrected survey). Times
are medians of --runs runs of each side, interleaved (hpcddf, baseline, square, then square,
baseline, hpcddf, ...) so drift and warm caches hit all sides alike; the runs are without memory
tracing. Peak memory comes from one more run of each with tracemalloc (numpy's allocations are
traced; for hpcddf the peaks of the parent and of every worker process are added up). The ratio
is to one float32 output image.

    python bench/mosaic.py [--runs 3] [--workers 2] [--block 256] [--cell 4.5] [--cache DIR]
                           [--no-corrections] [--facets 6]
On 2 cores, default size: ~7 min (a run: hpcddf ~3.5 s, baseline ~31 s, square ~33 s; plain:
hpcddf ~2 s, baseline ~36 s, square ~63 s); --cell 9 (4x fewer pixels): ~1.5 min.
Ends with: RESULT speedup=<baseline_s/hpcddf_s> peak_ratio=<hpcddf peak / output array> ...
corrections=<shifts,blanking,convolution|none> facets=<n: n x n per field> common_beam=<arcsec>
median_diff_over_noise=<median |hpcddf - baseline| / field noise>
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpcddf.engine.atomic import write_text_atomic  # noqa: E402
from hpcddf.mosaic.combine import (  # noqa: E402
    PRODUCTS,
    MosaicInput,
    MosaicOptions,
    make_mosaic,
    output_header,
)
from hpcddf.mosaic.corrections import (  # noqa: E402
    Beam,
    CorrectionOptions,
    Corrections,
    common_beam,
    convolution_kernel,
    field_corrections,
)
from hpcddf.mosaic.pointings import Pointing, neighbourhood  # noqa: E402
from hpcddf.mosaic.survey_sim import (  # noqa: E402
    FieldSpec,
    SkySource,
    field_wcs,
    hex_grid,
    random_sources,
    write_field,
)

SPACING = 2.58
PB_FWHM = 3.8
FIELD_HALF_DEG = 2.6
BEAMCUT = 0.3
STRIP_ROWS = 128  # the baseline reprojects the circle in strips of this many output rows
FACETS = 6        # --corrections: each field cut into FACETS x FACETS facets
MAX_OFFSET = 3.0  # arcsec: each facet's astrometric offset, 0 to this, in a random direction
BIG_BEAM = 25.0   # arcsec: the restoring beam of the BIG_FIELDS (the others: --res)
BIG_FIELDS = (3,)
BAD_NEAR_DEG = 1.3  # the bad facet of a field is one whose centre is this close to the mosaic centre
GUARD = 20        # the reference's guard (pixels) round each facet's input bounding box
EDGE_BEAMS = 2.0  # "near a facet edge": within this many common-beam FWHM of a facet boundary


def facet_errors(p: Pointing, centre: Pointing, spec: FieldSpec, seed: int) -> tuple[dict[int, tuple[float, float]], int]:
    """A field's per-facet astrometric offsets (arcsec east, north: the shift that corrects
    each, 0 to MAX_OFFSET in a random direction) and its bad facet (one under the mosaic)."""
    rng = np.random.default_rng(1000 + seed)
    offsets = {}
    for k in range(spec.facets ** 2):
        r, t = MAX_OFFSET * rng.random(), 2 * math.pi * rng.random()
        offsets[k] = (r * math.sin(t), r * math.cos(t))
    wcs = field_wcs(p, spec)
    side = spec.npix / spec.facets
    near = []
    for k in range(spec.facets ** 2):
        ra, dec = wcs.all_pix2world((k % spec.facets + 0.5) * side - 0.5, (k // spec.facets + 0.5) * side - 0.5, 0)  # type: ignore[attr-defined]
        if separation(float(ra), float(dec), centre.ra, centre.dec) < BAD_NEAR_DEG:
            near.append(k)
    return offsets, int(rng.choice(near))


def separation(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    d1, d2 = math.radians(dec1), math.radians(dec2)
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(math.radians(ra1 - ra2))
    return math.degrees(math.acos(min(1.0, max(-1.0, c))))


def build_inputs(cache: Path, cell: float, res: float, facets: int = 0) -> tuple[list, list[MosaicInput], list[SkySource]]:
    """The survey (written once, cached). ``facets`` > 0 (--corrections): every field cut into
    facets x facets facets with their offsets, one bad facet each (Badfacets.txt), BIG_FIELDS
    restored with BIG_BEAM; the images under the full product's names, which the field's
    corrections are read beside (field_corrections), and the inputs carry those corrections."""
    pts = hex_grid(180.0, 50.0, SPACING, 1)
    npix = 2 * int(FIELD_HALF_DEG / (cell / 3600.0))
    spec = FieldSpec(cell_arcsec=cell, resolution_arcsec=res, npix=npix, pb_fwhm_deg=PB_FWHM, noise=3e-4)
    sources = random_sources(pts, 300, 2.5, (0.01, 1.0), seed=5)
    if not facets:
        root, names = cache / f"survey-{cell:g}-{res:g}-{npix}", ("int.fits", "app.fits")
    else:
        root = cache / f"survey-corr-{cell:g}-{res:g}-{npix}-f{facets}-b{BIG_BEAM:g}"
        names = (PRODUCTS["full"].int_image, PRODUCTS["full"].app_image)
        spec = dataclasses.replace(spec, facets=facets)
    opts = CorrectionOptions(apply_shifts=True, blank_bad_facets=True)
    inputs = []
    for i, p in enumerate(pts):
        d = root / p.id
        ip, ap = d / names[0], d / names[1]
        done = d / "Badfacets.txt" if facets else ap  # written last
        if not (ip.is_file() and done.is_file()):
            t0 = time.perf_counter()
            if not facets:
                write_field(d, p, spec, sources, *names, seed=i)
            else:
                fspec = dataclasses.replace(spec, resolution_arcsec=BIG_BEAM) if i in BIG_FIELDS else spec
                offsets, bad = facet_errors(p, pts[0], fspec, i)
                write_field(d, p, fspec, sources, *names, seed=i, offsets=offsets,
                            facet_root=PRODUCTS["full"].tessel.removesuffix(".tessel.reg"))
                write_text_atomic(d / "Badfacets.txt", f"{bad}\n")
            print(f"wrote field {p.id} ({npix}x{npix}) in {time.perf_counter() - t0:.1f} s", flush=True)
        corr = field_corrections(d, p.id, PRODUCTS["full"].tessel, opts) if facets else None
        inputs.append(MosaicInput(p.id, str(ip), str(ap)) if corr is None
                      else MosaicInput(p.id, str(ip), str(ap), corrections=corr))
    return pts, inputs, sources


def circle(header: fits.Header) -> tuple[float, float, float]:
    """hpcddf's mosaic circle (combine.make_mosaic): centre (x, y) in 0-based pixels, radius."""
    return header["CRPIX1"] - 1.0, header["CRPIX2"] - 1.0, header["NAXIS1"] / 2.0


def circle_strips(header: fits.Header, rows: int = STRIP_ROWS) -> list[tuple[int, int, int, int]]:
    """Row strips (y0, y1, x0, x1) of the output that cover every pixel of the circle."""
    cx, cy, r = circle(header)
    ny, nx = header["NAXIS2"], header["NAXIS1"]
    out = []
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        dy = max(y0 - cy, 0.0, cy - (y1 - 1))
        if dy > r:
            continue
        hw = math.sqrt(r * r - dy * dy)
        x0, x1 = max(0, math.ceil(cx - hw)), min(nx, math.floor(cx + hw) + 1)
        if x0 < x1:
            out.append((y0, y1, x0, x1))
    return out


def outside_circle(header: fits.Header) -> np.ndarray:
    cx, cy, r = circle(header)
    y, x = np.ogrid[:header["NAXIS2"], :header["NAXIS1"]]
    return (x - cx) ** 2 + (y - cy) ** 2 > r * r


def facet_pieces(corr: Corrections, wcs: WCS, in_shape: tuple[int, int], out_wcs: WCS,
                 out_shape: tuple[int, int], regions: list[tuple[int, int, int, int]]) -> list:
    """The reference's per-facet reprojection (ddf-pipeline mosaic.py, reproj_inner): for each
    facet not listed bad, (input slices: the facet's bounding box plus GUARD pixels, that
    cutout's WCS with CRPIX moved so the content moves by the facet's shift, [(output box, mask
    of the facet polygon in the box)]). Its polygon is straight in the output's pixels between
    its vertices, as pyregion's get_mask draws it. The output boxes are the regions clipped to
    the facet's bounding box in the output (the reference reprojects each facet onto the whole
    output and zeroes it outside the polygon, and finds the input box from a mask of the whole
    input: the same pixels, here without the work on the empty rest)."""
    from matplotlib.path import Path as MplPath
    cell = abs(float(wcs.wcs.cdelt[1])) * 3600.0
    ny, nx = in_shape
    oy_n, ox_n = out_shape
    out = []
    for f in corr.facets:
        if f.blank:
            continue
        pg = np.asarray(f.polygon, dtype=float)
        ox, oy = out_wcs.all_world2pix(pg[:, 0], pg[:, 1], 0)
        bx0, bx1 = max(0, math.floor(ox.min())), min(ox_n, math.ceil(ox.max()) + 1)
        by0, by1 = max(0, math.floor(oy.min())), min(oy_n, math.ceil(oy.max()) + 1)
        boxes = [(max(y0, by0), min(y1, by1), max(x0, bx0), min(x1, bx1)) for y0, y1, x0, x1 in regions]
        boxes = [b for b in boxes if b[0] < b[1] and b[2] < b[3]]
        if not boxes:
            continue
        yy, xx = np.mgrid[by0:by1, bx0:bx1]
        inside = MplPath(np.column_stack([ox, oy])).contains_points(
            np.column_stack([xx.ravel(), yy.ravel()])).reshape(yy.shape)
        del yy, xx
        x, y = wcs.all_world2pix(pg[:, 0], pg[:, 1], 0)
        xmin, xmax = max(0, math.floor(x.min()) - GUARD), min(nx, math.ceil(x.max()) + 1 + GUARD)
        ymin, ymax = max(0, math.floor(y.min()) - GUARD), min(ny, math.ceil(y.max()) + 1 + GUARD)
        east, north = f.shift  # arcsec to apply: the reference's -RA_offset, -DEC_offset
        fwcs = wcs.deepcopy()  # CRPIX1 -= xmin + RA_offset/cell, CRPIX2 -= ymin - DEC_offset/cell
        fwcs.wcs.crpix = [wcs.wcs.crpix[0] - (xmin - east / cell), wcs.wcs.crpix[1] - (ymin + north / cell)]
        out.append(((slice(ymin, ymax), slice(xmin, xmax)), fwcs,
                    [(b, inside[b[0] - by0:b[1] - by0, b[2] - bx0:b[3] - bx0]) for b in boxes]))
    return out


def convolved_noise(app: np.ndarray, kernel: tuple[np.ndarray, float], box: int) -> float:
    """The clipped rms of the central box of the apparent image convolved to the common beam
    (as hpcddf measures it: combine._noise_of)."""
    from scipy.signal import fftconvolve

    from hpcddf.sky import clipped_rms
    ny, nx = app.shape
    half = box // 2 + kernel[0].shape[0]
    y0, x0 = max(0, ny // 2 - half), max(0, nx // 2 - half)
    sub = np.nan_to_num(app[y0:ny // 2 + half, x0:nx // 2 + half])
    return clipped_rms(fftconvolve(sub, kernel[0], mode="same") * kernel[1], box)


def baseline(inputs: list[MosaicInput], header: fits.Header, out: Path, on_circle: bool = True,
             target: Beam | None = None, facets: bool = False) -> None:
    """The reference approach, serial and whole-field (noise measured the same way as hpcddf),
    reprojected onto the circle's strips (on_circle) or, as ddf-pipeline, the whole square.

    With ``target`` (--convolve): an input restored with another beam has its whole int image
    convolved to it (FFT, times the beam area ratio), its noise measured after convolution.
    With ``facets`` (--apply_shift --use_badfacet): each facet reprojected on its own, moved by
    its shift and zeroed outside its polygon (facet_pieces), int and weight alike, bad facets
    skipped. ddf-pipeline runs the facets of an image in one subprocess each; this serial
    reference runs them one after the other in-process."""
    from reproject import reproject_interp
    from scipy.signal import fftconvolve, medfilt2d

    from hpcddf.sky import clipped_rms
    shape = (header["NAXIS2"], header["NAXIS1"])
    out_wcs = WCS(header)
    regions = circle_strips(header) if on_circle else [(0, shape[0], 0, shape[1])]
    isum = np.zeros(shape, dtype=np.float32)
    wsum = np.zeros(shape, dtype=np.float32)
    for inp in inputs:
        with fits.open(inp.int_path) as hi, fits.open(inp.app_path) as ha:
            int_ = np.asarray(hi[0].data[0, 0], dtype=np.float32)
            app = np.asarray(ha[0].data[0, 0], dtype=np.float32)
            wcs = WCS(hi[0].header).celestial
            beam_in = Beam.of(hi[0].header)
        kern = None
        if target is not None and beam_in is not None:
            kern = convolution_kernel(beam_in, target, abs(float(wcs.wcs.cdelt[1])) * 3600.0)
        noise = clipped_rms(app, 1500) if kern is None else convolved_noise(app, kern, 1500)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 outside the field: NaN, cut below
            beam = medfilt2d(app / int_)
        beam[beam < BEAMCUT] = 0
        weight = (beam / noise) ** 2
        del app, beam
        if kern is not None:
            int_ = (fftconvolve(np.nan_to_num(int_), kern[0], mode="same") * kern[1]).astype(np.float32)
        if facets:
            pieces = facet_pieces(inp.corrections, wcs, int_.shape, out_wcs, shape, regions)
        else:
            pieces = [((slice(None), slice(None)), wcs, [(b, None) for b in regions])]
        for cut, pwcs, boxes in pieces:
            for (y0, y1, x0, x1), mask in boxes:
                whole = not on_circle and not facets
                target_grid = header if whole else out_wcs[y0:y1, x0:x1]
                sub = (y1 - y0, x1 - x0)
                r = reproject_interp((int_[cut], pwcs), target_grid, shape_out=sub, return_footprint=False)
                w = reproject_interp((weight[cut], pwcs), target_grid, shape_out=sub, return_footprint=False)
                r[np.isnan(r)] = 0
                w[np.isnan(w)] = 0
                if mask is not None:
                    r[~mask] = 0
                    w[~mask] = 0
                isum[y0:y1, x0:x1] += (r * w).astype(np.float32)
                wsum[y0:y1, x0:x1] += w.astype(np.float32)
                del r, w
        del int_, weight
    with np.errstate(divide="ignore", invalid="ignore"):
        mosaic = isum / wsum
    mosaic[wsum == 0] = np.nan
    if on_circle:
        mosaic[outside_circle(header)] = np.nan
    fits.PrimaryHDU(mosaic, header).writeto(out, overwrite=True)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def traced(fn, *args) -> int:
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def warm_up() -> None:
    """Import what either side imports lazily: the first timed run must not pay for it."""
    import astropy.coordinates  # noqa: F401
    import astropy.stats  # noqa: F401
    import matplotlib.path  # noqa: F401
    import radio_beam  # noqa: F401
    import reproject  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import scipy.signal  # noqa: F401

    import hpcddf.sky  # noqa: F401


def interleaved(sides: list[str], runs: int) -> list[str]:
    """The sides in order, then in reverse, ...: each side is as often early as late."""
    return [s for k in range(runs) for s in (sides if k % 2 == 0 else sides[::-1])]


def max_diff(a: Path, b: Path) -> float:
    m_a, m_b = fits.getdata(a), fits.getdata(b)
    both = np.isfinite(m_a) & np.isfinite(m_b)
    return float(np.max(np.abs(m_a[both] - m_b[both]))) if both.any() else math.nan


def near_facet_edges(header: fits.Header, inputs: list[MosaicInput], facets: int, margin_arcsec: float) -> np.ndarray:
    """Output pixels within ``margin_arcsec`` of an inner facet boundary of any field (the
    simulated facets: a facets x facets grid of squares in the field's pixels)."""
    ny, nx = header["NAXIS2"], header["NAXIS1"]
    out_wcs = WCS(header)
    near = np.zeros((ny, nx), dtype=bool)
    for inp in inputs:
        h = fits.getheader(inp.int_path)
        wcs = WCS(h).celestial
        side = h["NAXIS1"] / facets
        m = margin_arcsec / (abs(float(wcs.wcs.cdelt[1])) * 3600.0) / side  # in facet sides
        for y0 in range(0, ny, 256):
            yy, xx = np.mgrid[y0:min(ny, y0 + 256), 0:nx]
            ra, dec = out_wcs.wcs_pix2world(xx, yy, 0)
            del xx, yy
            us = [(v + 0.5) / side for v in wcs.wcs_world2pix(ra, dec, 0)]
            inside = (us[0] > -m) & (us[0] < facets + m) & (us[1] > -m) & (us[1] < facets + m)
            for u in us:
                k = np.round(u)
                near[y0:y0 + u.shape[0]] |= inside & (np.abs(u - k) < m) & (k >= 1) & (k <= facets - 1)
    return near


def diff_stats(a: Path, b: Path, rms: float, near: np.ndarray | None) -> dict[str, float]:
    """|a - b| / rms where both are defined: max (and b there, / rms), median; off ``near``: max,
    99.9th percentile, max where |b| < 5 rms (no source), fraction of the compared pixels."""
    m_a, m_b = fits.getdata(a), fits.getdata(b)
    d = np.abs(m_a - m_b) / np.float32(rms)  # NaN where either is
    both = np.isfinite(d)
    if not both.any():
        return {k: math.nan for k in ("max", "at", "median", "off_max", "off_p999", "off_faint", "off_frac")}
    off = both & ~near if near is not None else both
    faint = off & (np.abs(m_b) < 5 * rms)
    i = np.unravel_index(np.nanargmax(d), d.shape)
    return {"max": float(d[i]), "at": float(m_b[i] / rms), "median": float(np.median(d[both])),
            "off_max": float(np.max(d[off])) if off.any() else math.nan,
            "off_p999": float(np.percentile(d[off], 99.9)) if off.any() else math.nan,
            "off_faint": float(np.max(d[faint])) if faint.any() else math.nan,
            "off_frac": float(off.sum() / both.sum())}


def astrometry(path: Path, sources: list[SkySource], rms: float, snr: float = 100.0) -> tuple[float, int]:
    """rms (arcsec) of the offsets of the mosaic's sources from their true positions: centroid of
    the positive pixels within 2 beam FWHM of each source whose peak is over ``snr`` x rms."""
    data, head = fits.getdata(path), fits.getheader(path)
    wcs = WCS(head)
    cell = abs(head["CDELT2"]) * 3600.0
    h = math.ceil(2.0 * head["BMAJ"] * 3600.0 / cell)
    offs = []
    for s in sources:
        x, y = wcs.all_world2pix([[s.ra, s.dec]], 0)[0]
        xi, yi = round(float(x)), round(float(y))
        if not (h <= xi < data.shape[1] - h and h <= yi < data.shape[0] - h):
            continue
        sub = data[yi - h:yi + h + 1, xi - h:xi + h + 1]
        if not np.isfinite(sub).all() or sub.max() < snr * rms:
            continue
        yy, xx = np.mgrid[yi - h:yi + h + 1, xi - h:xi + h + 1]
        pos = sub.clip(0)
        offs.append(math.hypot((xx * pos).sum() / pos.sum() - x, (yy * pos).sum() / pos.sum() - y) * cell)
    return (float(np.sqrt(np.mean(np.square(offs)))) if offs else math.nan), len(offs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per side, interleaved (default 3)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--block", type=int, default=0, help="0: hpcddf's choice from the memory budget")
    ap.add_argument("--cell", type=float, default=4.5)
    ap.add_argument("--res", type=float, default=20.0)
    ap.add_argument("--corrections", action=argparse.BooleanOptionalAction, default=True,
                    help="facet shifts, bad-facet blanking and convolution to a common beam (default on)")
    ap.add_argument("--facets", type=int, default=FACETS, help=f"facets per field side with --corrections ({FACETS})")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hpcddf-bench-mosaic")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    if a.corrections and a.facets < 2:
        ap.error("--facets must be >= 2")
    warm_up()
    facets = a.facets if a.corrections else 0
    pts, inputs, sources = build_inputs(a.cache, a.cell, a.res, facets)
    nb = neighbourhood(pts[0], pts)
    header = output_header("P000-low", pts[0].ra, pts[0].dec, nb.max_separation, a.cell, a.res)
    beams = [Beam.of(fits.getheader(i.int_path)) for i in inputs]
    target = common_beam([b for b in beams if b is not None])
    header["BMAJ"], header["BMIN"], header["BPA"] = target.bmaj / 3600.0, target.bmin / 3600.0, target.bpa
    out_bytes = header["NAXIS1"] * header["NAXIS2"] * 4
    strips = circle_strips(header)
    circle_px = int((~outside_circle(header)).sum())
    strip_px = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in strips)
    print(f"{len(inputs)} fields of {fits.getheader(inputs[0].int_path)['NAXIS1']}^2 px -> mosaic "
          f"{header['NAXIS1']}^2 px ({out_bytes / 1e6:.1f} MB float32), circle {circle_px} px; the baseline's "
          f"{len(strips)} strips {strip_px} px; {a.workers} workers, block {a.block or 'auto'}", flush=True)
    if a.corrections:
        big = [i.name for i, b in zip(inputs, beams) if b is not None and b.same(target)]
        shifts = [math.hypot(*f.shift) for i in inputs for f in i.corrections.facets]
        print(f"corrections: {facets}x{facets} facets per field shifted by {min(shifts):.2f}-{max(shifts):.2f}\" "
              f"(median {np.median(shifts):.2f}\"), bad facets " +
              ", ".join(f"{i.name}:{','.join(map(str, i.corrections.blanked))}" for i in inputs) +
              f"; common beam {target.bmaj:g}\" ({', '.join(big)} restored with it, "
              f"{len(inputs) - len(big)} fields convolved)", flush=True)
    outdir = a.cache / ("out-corr" if a.corrections else "out")
    outdir.mkdir(parents=True, exist_ok=True)
    opts = MosaicOptions(workers=a.workers, block=a.block, beamcut=BEAMCUT, noise_box=1500, common_beam="auto")
    out = {"hpcddf": outdir / "hpcddf.fits", "baseline": outdir / "baseline.fits",
           "square": outdir / "baseline-square.fits"}
    conv = target if a.corrections else None
    run = {"hpcddf": lambda: make_mosaic(inputs, header, out["hpcddf"], outdir / "hpcddf-w.fits", opts),
           "baseline": lambda: baseline(inputs, header, out["baseline"], True, conv, a.corrections),
           "square": lambda: baseline(inputs, header, out["square"], False, conv, a.corrections)}
    per = ", per facet" if a.corrections else ""
    what = {"hpcddf": f"blocks over footprints, {a.workers} workers",
            "baseline": f"whole fields, serial reproject_interp{per} onto the circle",
            "square": "the same onto the whole square, as ddf-pipeline"}
    times: dict[str, list[float]] = {k: [] for k in run}
    for side in interleaved(list(run), a.runs):
        times[side].append(timed(run[side]))
        print(f"{side} ({what[side]}): {times[side][-1]:.1f} s", flush=True)
    t = {k: float(np.median(v)) for k, v in times.items()}

    peak_base = traced(baseline, inputs, header, out["baseline"], True, conv, a.corrections)
    peak_square = traced(baseline, inputs, header, out["square"], False, conv, a.corrections)
    res = make_mosaic(inputs, header, out["hpcddf"], outdir / "hpcddf-w.fits",
                      dataclasses.replace(opts, measure_memory=True))
    peak_ours = res.peak_bytes or 0
    rms = float(np.median(list(res.noise.values())))
    near = near_facet_edges(header, inputs, facets, EDGE_BEAMS * target.bmaj) if facets else None
    st = diff_stats(out["hpcddf"], out["baseline"], rms, near)
    print(f"blocks computed {res.blocks_computed}/{res.blocks_total}, (block, field) pairs {res.input_blocks}")
    print("hpcddf peak by phase: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in res.peak_phases.items()))
    print(f"peak traced memory: hpcddf {peak_ours / 1e6:.1f} MB, baseline {peak_base / 1e6:.1f} MB "
          f"(whole square {peak_square / 1e6:.1f} MB); output {out_bytes / 1e6:.1f} MB")
    print(f"max |hpcddf - baseline| where both defined: {st['max'] * rms:.3g} Jy/beam ({st['max']:.2f} x field noise "
          f"{rms:.3g}, where the baseline is {st['at']:.0f} x noise), median {st['median']:.3f} x noise; "
          f"|baseline - square| {max_diff(out['baseline'], out['square']):.3g}")
    if near is not None:
        print(f"away from facet edges (> {EDGE_BEAMS:g} x {target.bmaj:g}\" from any field's facet boundary, "
              f"{100 * st['off_frac']:.0f} % of the pixels): max {st['off_max']:.2f}, 99.9 % {st['off_p999']:.3f}, "
              f"max off sources (baseline < 5 x noise) {st['off_faint']:.3f} x noise")
        shifts = [math.hypot(*f.shift) for i in inputs for f in i.corrections.facets]
        pos = {k: astrometry(out[k], sources, rms) for k in ("hpcddf", "baseline")}
        print(f"source positions (peak > 100 x noise) vs truth, rms: hpcddf {pos['hpcddf'][0]:.2f}\" "
              f"({pos['hpcddf'][1]} sources), baseline {pos['baseline'][0]:.2f}\" ({pos['baseline'][1]}); "
              f"the facet offsets corrected: rms {math.sqrt(np.mean(np.square(shifts))):.2f}\"")
    spread = " ".join(f"{k}_min={min(v):.1f} {k}_max={max(v):.1f}" for k, v in times.items())
    print(f"RESULT speedup={t['baseline'] / t['hpcddf']:.2f} peak_ratio={peak_ours / out_bytes:.2f} "
          f"hpcddf_s={t['hpcddf']:.1f} baseline_s={t['baseline']:.1f} baseline_peak_ratio={peak_base / out_bytes:.2f} "
          f"max_diff_over_noise={st['max']:.2f} speedup_square={t['square'] / t['hpcddf']:.2f} "
          f"square_s={t['square']:.1f} square_peak_ratio={peak_square / out_bytes:.2f} runs={a.runs} {spread} "
          f"pixels={circle_px} square_pixels={header['NAXIS1'] * header['NAXIS2']} "
          f"blocks={res.blocks_computed}/{res.blocks_total} workers={a.workers} block={a.block or 'auto'} "
          f"cell={a.cell:g} res={a.res:g} "
          f"corrections={'shifts,blanking,convolution' if a.corrections else 'none'} facets={facets} "
          f"common_beam={target.bmaj:g} median_diff_over_noise={st['median']:.3f}")


if __name__ == "__main__":
    main()
