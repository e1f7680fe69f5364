"""Bilinear resampling of an input cutout onto an output block, with each facet's shift folded in.

Why not ``reproject_interp`` per block: it transforms every output pixel through two full WCS
(output pixel -> sky -> input pixel) and checks the round trip, which was 9.5 of 17 s of a
corrected 7-field mosaic (bench/mosaic.py, one worker). The mapping between two tangent-plane
grids a few degrees across is smooth, so it is computed exactly on a coarse grid (every
``GRID_STEP`` output pixels, plus the block's last row and column) and interpolated bilinearly;
the error is below 1e-3 pixel for a field 2 deg off the mosaic centre
(tests/unit/test_mosaic_resample.py measures it).

A facet's astrometric shift moves its content by (dy, dx): the corrected image at input pixel p
is the original at p - shift(facet of p), as DDFacet's RestoreAndShift and ddf-pipeline's
``--apply_shift`` move each facet. Subtracting the shift from the sampling coordinates does that
in the same bilinear interpolation, instead of a separate spline shift of every facet's pixels
first (2.4 s of those 17). The interpolation is then one bilinear step, as the reference's
(reproject_interp at the shifted position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

GRID_STEP = 16   # output pixels between exactly transformed points


def out_to_in(in_wcs: Any, out_wcs: Any, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Output pixel coordinates (x, y) through the sky into the input's (x, y); NaN where a
    point has no position in either projection."""
    with np.errstate(invalid="ignore"):
        ra, dec = out_wcs.all_pix2world(xs, ys, 0)
        return in_wcs.all_world2pix(ra, dec, 0, quiet=True)


def _grid(lo: int, hi: int, step: int) -> np.ndarray:
    return np.unique(np.r_[np.arange(lo, hi, step), hi - 1]).astype(float)


def pixel_map(in_wcs: Any, out_wcs: Any, box: tuple[int, int, int, int],
              step: int = GRID_STEP) -> tuple[np.ndarray, np.ndarray] | None:
    """Input pixel coordinates (y, x), whole-image, of every output pixel of ``box``
    (y0, y1, x0, x1); None where the block leaves the input's projection (no finite mapping)."""
    y0, y1, x0, x1 = box
    gy, gx = _grid(y0, y1, step), _grid(x0, x1, step)
    xx, yy = np.meshgrid(gx, gy)
    ix, iy = out_to_in(in_wcs, out_wcs, xx, yy)
    if not (np.isfinite(ix).all() and np.isfinite(iy).all()):
        return _exact_map(in_wcs, out_wcs, box)
    fy, fx = np.arange(y0, y1, dtype=float), np.arange(x0, x1, dtype=float)
    return (_bilinear(_bilinear(iy, gx, fx, axis=1), gy, fy, axis=0),
            _bilinear(_bilinear(ix, gx, fx, axis=1), gy, fy, axis=0))


def _bilinear(values: np.ndarray, grid: np.ndarray, at: np.ndarray, axis: int) -> np.ndarray:
    """``values`` known at ``grid`` along ``axis``, linearly interpolated to ``at`` (gathers,
    not a matrix product: BLAS threads oversubscribe the cores the mosaic's workers use)."""
    if len(grid) == 1:
        return np.repeat(values, len(at), axis=axis)
    j = np.clip(np.searchsorted(grid, at, side="right") - 1, 0, len(grid) - 2)
    t = ((at - grid[j]) / (grid[j + 1] - grid[j])).reshape((-1, 1) if axis == 0 else (1, -1))
    return np.take(values, j, axis=axis) * (1.0 - t) + np.take(values, j + 1, axis=axis) * t


def _exact_map(in_wcs: Any, out_wcs: Any, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Every pixel through the WCS (a block at the edge of a projection); NaN stays NaN."""
    y0, y1, x0, x1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(float)
    ix, iy = out_to_in(in_wcs, out_wcs, xx, yy)
    ok = np.isfinite(ix) & np.isfinite(iy)
    if not ok.any():
        return None
    return np.where(ok, iy, -1e9), np.where(ok, ix, -1e9)


def fold_shifts(cy: np.ndarray, cx: np.ndarray, labels: np.ndarray,
                shifts_px: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Cutout coordinates moved back by the shift of the facet each one falls in (``labels``:
    facet number per cutout pixel, -1 outside every facet: not moved)."""
    ny, nx = labels.shape
    ly = np.clip(cy + 0.5, 0, ny - 1).astype(np.intp)    # nearest pixel: clipped, so truncation rounds
    lx = np.clip(cx + 0.5, 0, nx - 1).astype(np.intp)
    table = np.asarray(list(shifts_px) + [(0.0, 0.0)], dtype=float)
    moved = table[labels[ly, lx]]                          # label -1: the appended (0, 0)
    return cy - moved[..., 0], cx - moved[..., 1]


def resample(planes: Sequence[np.ndarray], coords: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """Each cutout plane sampled bilinearly at the cutout coordinates (y, x); 0 outside it."""
    from scipy.ndimage import map_coordinates
    stacked = np.stack(coords)
    return [map_coordinates(p, stacked, order=1, mode="constant", cval=0.0, prefilter=False)
            .astype(np.float32, copy=False) for p in planes]
