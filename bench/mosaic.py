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

Same inputs for every run: a LoTSS-like hexagonal survey (2.58 deg spacing, Gaussian primary beam
of 3.8 deg FWHM, low-resolution product: 4.5" cells, 20" beam; every field imaged out to 2.6 deg),
written once to a cache directory. Times are medians of --runs runs of each side, interleaved
(hpcddf, baseline, square, then square, baseline, hpcddf, ...) so drift and warm caches hit all
sides alike; the runs are without memory tracing. Peak memory comes from one more run of each
with tracemalloc (numpy's allocations are traced; for hpcddf the peaks of the parent and of
every worker process are added up). The ratio is to one float32 output image.

    python bench/mosaic.py [--runs 3] [--workers 2] [--block 256] [--cell 4.5] [--cache DIR]
On 2 cores, default size: ~9 min (a run: hpcddf ~12 s, square ~65 s, baseline ~50 s);
--cell 9 (4x fewer pixels): ~2 min (hpcddf ~4.4 s, square ~10.6 s, baseline ~8.4 s).
Ends with: RESULT speedup=<baseline_s/hpcddf_s> peak_ratio=<hpcddf peak / output array> ...
"""

from __future__ import annotations

import argparse
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

from hpcddf.mosaic.combine import MosaicInput, MosaicOptions, make_mosaic, output_header  # noqa: E402
from hpcddf.mosaic.pointings import neighbourhood  # noqa: E402
from hpcddf.mosaic.survey_sim import FieldSpec, hex_grid, random_sources, write_field  # noqa: E402

SPACING = 2.58
PB_FWHM = 3.8
FIELD_HALF_DEG = 2.6
BEAMCUT = 0.3
STRIP_ROWS = 128  # the baseline reprojects the circle in strips of this many output rows


def build_inputs(cache: Path, cell: float, res: float) -> tuple[list, list[MosaicInput]]:
    pts = hex_grid(180.0, 50.0, SPACING, 1)
    npix = 2 * int(FIELD_HALF_DEG / (cell / 3600.0))
    spec = FieldSpec(cell_arcsec=cell, resolution_arcsec=res, npix=npix, pb_fwhm_deg=PB_FWHM, noise=3e-4)
    root = cache / f"survey-{cell:g}-{res:g}-{npix}"
    sources = random_sources(pts, 300, 2.5, (0.01, 1.0), seed=5)
    inputs = []
    for i, p in enumerate(pts):
        d = root / p.id
        ip, ap = d / "int.fits", d / "app.fits"
        if not (ip.is_file() and ap.is_file()):
            t0 = time.perf_counter()
            write_field(d, p, spec, sources, "int.fits", "app.fits", seed=i)
            print(f"wrote field {p.id} ({npix}x{npix}) in {time.perf_counter() - t0:.1f} s", flush=True)
        inputs.append(MosaicInput(p.id, str(ip), str(ap)))
    return pts, inputs


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


def baseline(inputs: list[MosaicInput], header: fits.Header, out: Path, on_circle: bool = True) -> None:
    """The reference approach, serial and whole-field (noise measured the same way as hpcddf),
    reprojected onto the circle's strips (on_circle) or, as ddf-pipeline, the whole square."""
    from reproject import reproject_interp
    from scipy.signal import medfilt2d

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
        noise = clipped_rms(app, 1500)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 outside the field: NaN, cut below
            beam = medfilt2d(app / int_)
        beam[beam < BEAMCUT] = 0
        weight = (beam / noise) ** 2
        del app, beam
        for y0, y1, x0, x1 in regions:
            target = out_wcs[y0:y1, x0:x1] if on_circle else header
            sub = (y1 - y0, x1 - x0)
            r = reproject_interp((int_, wcs), target, shape_out=sub, return_footprint=False)
            w = reproject_interp((weight, wcs), target, shape_out=sub, return_footprint=False)
            r[np.isnan(r)] = 0
            w[np.isnan(w)] = 0
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per side, interleaved (default 3)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--block", type=int, default=0, help="0: hpcddf's choice from the memory budget")
    ap.add_argument("--cell", type=float, default=4.5)
    ap.add_argument("--res", type=float, default=20.0)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hpcddf-bench-mosaic")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    warm_up()
    pts, inputs = build_inputs(a.cache, a.cell, a.res)
    nb = neighbourhood(pts[0], pts)
    header = output_header("P000-low", pts[0].ra, pts[0].dec, nb.max_separation, a.cell, a.res)
    out_bytes = header["NAXIS1"] * header["NAXIS2"] * 4
    strips = circle_strips(header)
    circle_px = int((~outside_circle(header)).sum())
    strip_px = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in strips)
    print(f"{len(inputs)} fields of {fits.getheader(inputs[0].int_path)['NAXIS1']}^2 px -> mosaic "
          f"{header['NAXIS1']}^2 px ({out_bytes / 1e6:.1f} MB float32), circle {circle_px} px; the baseline's "
          f"{len(strips)} strips {strip_px} px; {a.workers} workers, block {a.block or 'auto'}", flush=True)
    outdir = a.cache / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    opts = MosaicOptions(workers=a.workers, block=a.block, beamcut=BEAMCUT, noise_box=1500)
    out = {"hpcddf": outdir / "hpcddf.fits", "baseline": outdir / "baseline.fits",
           "square": outdir / "baseline-square.fits"}
    run = {"hpcddf": lambda: make_mosaic(inputs, header, out["hpcddf"], outdir / "hpcddf-w.fits", opts),
           "baseline": lambda: baseline(inputs, header, out["baseline"], True),
           "square": lambda: baseline(inputs, header, out["square"], False)}
    what = {"hpcddf": f"blocks over footprints, {a.workers} workers",
            "baseline": "whole fields, serial reproject_interp onto the circle",
            "square": "the same onto the whole square, as ddf-pipeline"}
    times: dict[str, list[float]] = {k: [] for k in run}
    for side in interleaved(list(run), a.runs):
        times[side].append(timed(run[side]))
        print(f"{side} ({what[side]}): {times[side][-1]:.1f} s", flush=True)
    t = {k: float(np.median(v)) for k, v in times.items()}

    peak_base = traced(baseline, inputs, header, out["baseline"], True)
    peak_square = traced(baseline, inputs, header, out["square"], False)
    res = make_mosaic(inputs, header, out["hpcddf"], outdir / "hpcddf-w.fits",
                      MosaicOptions(workers=a.workers, block=a.block, beamcut=BEAMCUT, noise_box=1500,
                                    measure_memory=True))
    peak_ours = res.peak_bytes or 0
    rms = float(np.median(list(res.noise.values())))
    diff = max_diff(out["hpcddf"], out["baseline"])
    print(f"blocks computed {res.blocks_computed}/{res.blocks_total}, (block, field) pairs {res.input_blocks}")
    print("hpcddf peak by phase: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in res.peak_phases.items()))
    print(f"peak traced memory: hpcddf {peak_ours / 1e6:.1f} MB, baseline {peak_base / 1e6:.1f} MB "
          f"(whole square {peak_square / 1e6:.1f} MB); output {out_bytes / 1e6:.1f} MB")
    print(f"max |hpcddf - baseline| where both defined: {diff:.3g} Jy/beam ({diff / rms:.2f} x field noise); "
          f"|baseline - square| {max_diff(out['baseline'], out['square']):.3g}")
    spread = " ".join(f"{k}_min={min(v):.1f} {k}_max={max(v):.1f}" for k, v in times.items())
    print(f"RESULT speedup={t['baseline'] / t['hpcddf']:.2f} peak_ratio={peak_ours / out_bytes:.2f} "
          f"hpcddf_s={t['hpcddf']:.1f} baseline_s={t['baseline']:.1f} baseline_peak_ratio={peak_base / out_bytes:.2f} "
          f"max_diff_over_noise={diff / rms:.2f} speedup_square={t['square'] / t['hpcddf']:.2f} "
          f"square_s={t['square']:.1f} square_peak_ratio={peak_square / out_bytes:.2f} runs={a.runs} {spread} "
          f"pixels={circle_px} square_pixels={header['NAXIS1'] * header['NAXIS2']} "
          f"blocks={res.blocks_computed}/{res.blocks_total} workers={a.workers} block={a.block or 'auto'} "
          f"cell={a.cell:g} res={a.res:g}")


if __name__ == "__main__":
    main()
