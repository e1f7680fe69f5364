#!/usr/bin/env python3
"""A 7-field mosaic: hpcddf's block-wise, footprint-only, parallel mosaic vs. the reference
approach (ddf-pipeline's mosaic.py: each whole field read, its beam filtered over the whole
image, reprojected onto the whole output with reproject_interp, serially, then combined).

Same inputs, one run: a LoTSS-like hexagonal survey (2.58 deg spacing, Gaussian primary beam of
3.8 deg FWHM, low-resolution product: 4.5" cells, 20" beam; every field imaged out to 2.6 deg),
written once to a cache directory. Times come from runs without memory tracing; peak memory
from separate runs with tracemalloc (numpy's allocations are traced; for hpcddf the peaks of
the parent and of every worker process are added up). The ratio is to one float32 output image.

    python bench/mosaic.py [--workers 2] [--block 256] [--cell 4.5] [--cache DIR]
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


def baseline(inputs: list[MosaicInput], header: fits.Header, out: Path) -> None:
    """The reference approach, serial and whole-image (noise measured the same way as hpcddf)."""
    from reproject import reproject_interp
    from scipy.signal import medfilt2d

    from hpcddf.sky import clipped_rms
    shape = (header["NAXIS2"], header["NAXIS1"])
    isum = np.zeros(shape, dtype=np.float32)
    wsum = np.zeros(shape, dtype=np.float32)
    for inp in inputs:
        with fits.open(inp.int_path) as hi, fits.open(inp.app_path) as ha:
            int_ = np.asarray(hi[0].data[0, 0], dtype=np.float32)
            app = np.asarray(ha[0].data[0, 0], dtype=np.float32)
            wcs = WCS(hi[0].header).celestial
        noise = clipped_rms(app, 1500)
        beam = medfilt2d(app / int_)
        beam[beam < BEAMCUT] = 0
        weight = (beam / noise) ** 2
        del app, beam
        r = reproject_interp((int_, wcs), header, shape_out=shape, return_footprint=False)
        w = reproject_interp((weight, wcs), header, shape_out=shape, return_footprint=False)
        del int_, weight
        r[np.isnan(r)] = 0
        w[np.isnan(w)] = 0
        isum += (r * w).astype(np.float32)
        wsum += w.astype(np.float32)
        del r, w
    with np.errstate(divide="ignore", invalid="ignore"):
        mosaic = isum / wsum
    mosaic[wsum == 0] = np.nan
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--block", type=int, default=0, help="0: hpcddf's choice from the memory budget")
    ap.add_argument("--cell", type=float, default=4.5)
    ap.add_argument("--res", type=float, default=20.0)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hpcddf-bench-mosaic")
    a = ap.parse_args()
    pts, inputs = build_inputs(a.cache, a.cell, a.res)
    nb = neighbourhood(pts[0], pts)
    header = output_header("P000-low", pts[0].ra, pts[0].dec, nb.max_separation, a.cell, a.res)
    out_bytes = header["NAXIS1"] * header["NAXIS2"] * 4
    print(f"{len(inputs)} fields of {fits.getheader(inputs[0].int_path)['NAXIS1']}^2 px -> mosaic "
          f"{header['NAXIS1']}^2 px ({out_bytes / 1e6:.1f} MB float32); {a.workers} workers, block {a.block or 'auto'}",
          flush=True)
    outdir = a.cache / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    opts = MosaicOptions(workers=a.workers, block=a.block, beamcut=BEAMCUT, noise_box=1500)

    def ours() -> object:
        return make_mosaic(inputs, header, outdir / "hpcddf.fits", outdir / "hpcddf-w.fits", opts)

    t_base = timed(baseline, inputs, header, outdir / "baseline.fits")
    print(f"baseline (whole fields, serial reproject_interp): {t_base:.1f} s", flush=True)
    t_ours = timed(ours)
    print(f"hpcddf (blocks over footprints, {a.workers} workers): {t_ours:.1f} s", flush=True)
    peak_base = traced(baseline, inputs, header, outdir / "baseline.fits")
    res = make_mosaic(inputs, header, outdir / "hpcddf.fits", outdir / "hpcddf-w.fits",
                      MosaicOptions(workers=a.workers, block=a.block, beamcut=BEAMCUT, noise_box=1500,
                                    measure_memory=True))
    peak_ours = res.peak_bytes or 0
    m_ours, m_base = fits.getdata(outdir / "hpcddf.fits"), fits.getdata(outdir / "baseline.fits")
    both = np.isfinite(m_ours) & np.isfinite(m_base)
    diff = float(np.max(np.abs(m_ours[both] - m_base[both]))) if both.any() else math.nan
    rms = float(np.median(list(res.noise.values())))
    print(f"blocks computed {res.blocks_computed}/{res.blocks_total}, (block, field) pairs {res.input_blocks}")
    print("hpcddf peak by phase: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in res.peak_phases.items()))
    print(f"peak traced memory: hpcddf {peak_ours / 1e6:.1f} MB, baseline {peak_base / 1e6:.1f} MB; "
          f"output {out_bytes / 1e6:.1f} MB")
    print(f"max |hpcddf - baseline| where both defined: {diff:.3g} Jy/beam ({diff / rms:.2f} x field noise)")
    print(f"RESULT speedup={t_base / t_ours:.2f} peak_ratio={peak_ours / out_bytes:.2f} "
          f"hpcddf_s={t_ours:.1f} baseline_s={t_base:.1f} baseline_peak_ratio={peak_base / out_bytes:.2f} "
          f"max_diff_over_noise={diff / rms:.2f}")


if __name__ == "__main__":
    main()
