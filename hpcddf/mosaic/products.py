"""What is made from a finished mosaic for people to look at and use: a PNG quick look and a
PyBDSF source list."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hpcddf.engine.atomic import atomic_path
from hpcddf.sky import image_plane


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

    from hpcddf.engine.atomic import atomic_path
    from hpcddf.sky import pybdsf_to_log
    freq = float(fits.getheader(mosaic).get("RESTFRQ", 144e6))  # bdsf wants one; the mosaic has no FREQ axis
    with pybdsf_to_log(out.with_suffix(".pybdsf.log")):
        img = bdsf.process_image(str(mosaic), thresh_isl=3.0, thresh_pix=5.0, adaptive_rms_box=True,
                                 frequency=freq, quiet=True, output_opts=False)
        with atomic_path(out) as tmp:
            img.write_catalog(outfile=str(tmp), format="fits", catalog_type="srl", clobber=True)
