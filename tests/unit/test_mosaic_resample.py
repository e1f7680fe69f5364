"""The mosaic's bilinear resampling (hpcddf/mosaic/resample.py): the coarse-grid pixel map agrees
with the full WCS transform, the folded facet shift moves a facet's content as a whole-pixel
roll does, and the bilinear result agrees with reproject_interp on the same block."""

from __future__ import annotations

import math

import numpy as np
from astropy.wcs import WCS

from hpcddf.mosaic.resample import fold_shifts, pixel_map, resample


def sin_wcs(ra: float, dec: float, cell_arcsec: float, npix: int) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [npix / 2 + 1, npix / 2 + 1]
    w.wcs.cdelt = [-cell_arcsec / 3600, cell_arcsec / 3600]
    return w


# a 2.6-deg field 2 deg from the mosaic centre at dec 55: the largest distortion a LoTSS-like
# mosaic sees between an input and the output grid
IN = sin_wcs(150.0 + 2.0 / math.cos(math.radians(55.0)), 55.5, 4.5, 2100)
OUT = sin_wcs(150.0, 55.0, 4.5, 4000)


def exact(box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    y0, y1, x0, x1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(float)
    ix, iy = IN.all_world2pix(*OUT.all_pix2world(xx, yy, 0), 0)
    return iy, ix


def test_coarse_pixel_map_agrees_with_the_full_transform_to_a_thousandth_of_a_pixel() -> None:
    for box in [(2400, 2656, 2900, 3156), (1000, 1100, 3300, 3437), (2000, 2003, 3000, 3300)]:
        got = pixel_map(IN, OUT, box)
        assert got is not None
        want = exact(box)
        err = max(float(np.abs(got[0] - want[0]).max()), float(np.abs(got[1] - want[1]).max()))
        assert err < 1e-3, (box, err)


def test_bilinear_resampling_matches_reproject_interp() -> None:
    from reproject import reproject_interp
    rng = np.random.default_rng(3)
    box = (2400, 2528, 2900, 3028)
    iy, ix = exact(box)
    cut = (slice(int(iy.min()) - 3, int(iy.max()) + 4), slice(int(ix.min()) - 3, int(ix.max()) + 4))
    plane = rng.normal(size=(cut[0].stop - cut[0].start, cut[1].stop - cut[1].start)).astype(np.float32)
    mapped = pixel_map(IN, OUT, box)
    got = resample([plane], (mapped[0] - cut[0].start, mapped[1] - cut[1].start))[0]
    want = reproject_interp((plane, IN[cut]), OUT[box[0]:box[1], box[2]:box[3]], shape_out=got.shape,
                            order="bilinear", return_footprint=False)
    assert np.abs(got - want).max() < 1e-3


def test_folded_shift_moves_only_its_facet_by_the_shift() -> None:
    """Content moved by (dy, dx) = (2, -3) in facet 1 (the right half); facet 0 stays."""
    rng = np.random.default_rng(5)
    img = rng.normal(size=(60, 80)).astype(np.float32)
    labels = np.zeros(img.shape, dtype=np.int16)
    labels[:, 40:] = 1
    labels[:5, :] = -1                                 # outside every facet: not moved
    cy, cx = np.mgrid[0:60, 0:80].astype(float)
    fy, fx = fold_shifts(cy, cx, labels, [(0.0, 0.0), (2.0, -3.0)])
    out = resample([img], (fy, fx))[0]
    assert np.array_equal(out[:, :40], img[:, :40])
    assert np.array_equal(out[10:50, 45:75], img[8:48, 48:78])   # out[y, x] = img[y - 2, x + 3]
    assert np.array_equal(out[:5, 45:75], img[:5, 45:75])


def test_single_row_and_column_blocks_map_too() -> None:
    for box in [(2000, 2001, 3000, 3200), (2000, 2200, 3000, 3001), (2000, 2001, 3000, 3001)]:
        got, want = pixel_map(IN, OUT, box), exact(box)
        assert got[0].shape == want[0].shape
        assert np.abs(got[0] - want[0]).max() < 1e-3 and np.abs(got[1] - want[1]).max() < 1e-3
