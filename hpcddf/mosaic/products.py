"""The mosaic's output side: the sums turned into the image in place, small islands blanked,
FITS streamed out in row chunks, then what people look at and use: a PNG quick look and a
PyBDSF source list."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from hpcddf.engine.atomic import atomic_path
from hpcddf.sky import image_plane

ROWS_PER_WRITE = 512
ROWS_PER_STEP = 128       # row chunks of whole-mosaic passes: temporaries stay small


def write_streamed(path: Path, header: Any, data: np.ndarray) -> None:
    """Write a 2-D float32 image in row chunks (no full-size big-endian copy), atomically."""
    from astropy.io import fits
    with atomic_path(path) as tmp:
        tmp.unlink()
        out = fits.StreamingHDU(str(tmp), header)
        for y in range(0, data.shape[0], ROWS_PER_WRITE):
            out.write(np.ascontiguousarray(data[y:y + ROWS_PER_WRITE], dtype=">f4"))
        out.close()


def finish_mosaic(isum: np.ndarray, wsum: np.ndarray, centre: tuple[float, float], radius: float) -> None:
    """isum becomes the mosaic in place: isum/wsum, NaN where no weight or outside the circle."""
    cx, cy = centre
    x = np.arange(isum.shape[1], dtype=np.float64)
    for y in range(0, isum.shape[0], ROWS_PER_STEP):
        rows = slice(y, y + ROWS_PER_STEP)
        w = wsum[rows]
        yy = np.arange(y, y + w.shape[0], dtype=np.float64)[:, None]
        outside = (x[None, :] - cx) ** 2 + (yy - cy) ** 2 > radius * radius
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(isum[rows], w, out=isum[rows], where=w > 0)
        isum[rows][(w <= 0) | outside] = np.nan


def remove_islands(data: np.ndarray, size: int) -> int:
    """Blank isolated islands of at most ``size`` finite pixels (4-connected); how many pixels.

    Memory: one int32 label image; each small island is blanked inside its own bounding box
    (an index array over the whole image would be int64, 2x the mosaic)."""
    if size <= 0:
        return 0
    from scipy import ndimage
    labels = np.empty(data.shape, dtype=np.int32)
    n = ndimage.label(np.isfinite(data), output=labels)
    if n == 0:
        return 0
    blanked = 0
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        # a 4-connected island spans at most (pixels) rows + columns - 1: larger boxes are big
        # islands (no np.bincount: it would copy the labels as int64)
        if where is None or (where[0].stop - where[0].start) + (where[1].stop - where[1].start) - 1 > size:
            continue
        island = labels[where] == k
        if island.sum() <= size:
            data[where][island] = np.nan
            blanked += int(island.sum())
    return blanked


def write_preview(mosaic_path: str | Path, png_path: str | Path, max_pixels: int = 1500) -> None:
    """A PNG quick look of a mosaic (strided read, percentile stretch), written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data, _, header = image_plane(str(mosaic_path))
    step = max(1, math.ceil(max(data.shape) / max_pixels))
    img = np.asarray(data[::step, ::step], dtype=np.float32)
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [1, 99.7]) if finite.size else (0.0, 1.0))
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(img, origin="lower", cmap="gray_r", vmin=lo, vmax=hi)
    ax.set_title(str(header.get("OBJECT", Path(mosaic_path).stem)))
    ax.set_xticks([])
    ax.set_yticks([])
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_catalogue(mosaic: Path, out: Path) -> None:
    """A PyBDSF source list of the mosaic (FITS), written atomically."""
    import bdsf
    from astropy.io import fits

    from hpcddf.sky import pybdsf_to_log
    freq = float(fits.getheader(mosaic).get("RESTFRQ", 144e6))  # bdsf wants one; the mosaic has no FREQ axis
    with pybdsf_to_log(out.with_suffix(".pybdsf.log")):
        img = bdsf.process_image(str(mosaic), thresh_isl=3.0, thresh_pix=5.0, adaptive_rms_box=True,
                                 frequency=freq, quiet=True, output_opts=False)
        with atomic_path(out) as tmp:
            img.write_catalog(outfile=str(tmp), format="fits", catalog_type="srl", clobber=True)
