"""Image and catalogue helpers that more than one pipeline uses (bootstrap, offsets, quality,
mosaic): sky coordinates, unique and isolated matches, the clipped rms of an image, and PyBDSF's
output kept out of a command's own."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from hpcddf.errors import HpcddfError


class SkyError(HpcddfError):
    """An image cannot be read or measured."""


def sky_coords(ra: Any, dec: Any) -> Any:
    """SkyCoord of right ascensions and declinations in degrees."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord
    return SkyCoord(np.asarray(ra, dtype=float) * u.deg, np.asarray(dec, dtype=float) * u.deg)


def unique_matches(ra: np.ndarray, dec: np.ndarray, cat_ra: np.ndarray, cat_dec: np.ndarray,
                   radius_arcsec: float) -> np.ndarray:
    """Index into the catalogue of each source's match if exactly one lies within the radius, else -1."""
    from astropy import units as u
    from astropy.coordinates import search_around_sky
    out = np.full(len(ra), -1, dtype=int)
    if len(ra) == 0 or len(cat_ra) == 0:
        return out
    i, j, _, _ = search_around_sky(sky_coords(ra, dec), sky_coords(cat_ra, cat_dec), radius_arcsec * u.arcsec)
    counts = np.bincount(i, minlength=len(ra))
    for a, b in zip(i, j):
        if counts[a] == 1:
            out[a] = b
    return out


def isolated(ra: np.ndarray, dec: np.ndarray, min_sep_arcsec: float) -> np.ndarray:
    """Sources whose nearest neighbour is farther than ``min_sep_arcsec``."""
    from astropy.coordinates import match_coordinates_sky
    if len(ra) < 2:
        return np.ones(len(ra), dtype=bool)
    c = sky_coords(ra, dec)
    _, sep, _ = match_coordinates_sky(c, c, nthneighbor=2)
    return sep.arcsec > min_sep_arcsec


@contextlib.contextmanager
def pybdsf_to_log(path: Any) -> Iterator[None]:
    """PyBDSF prints to stdout and logs to the root logger's handlers: both go to ``path``, so
    a command's output (``--json``) stays clean and the detail is still kept."""
    import logging
    lg = logging.getLogger("PyBDSF")
    with open(path, "a") as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        old = lg.propagate
        lg.propagate = False
        lg.addHandler(handler)
        try:
            with contextlib.redirect_stdout(fh):
                yield
        finally:
            lg.removeHandler(handler)
            lg.propagate = old


def image_plane(path: str) -> tuple[Any, Any, Any]:
    """(2-D memory-mapped data, celestial WCS, header) of a FITS image with any leading axes."""
    from astropy.io import fits
    from astropy.wcs import WCS
    try:
        hdul = fits.open(path, memmap=True)
    except (OSError, ValueError) as exc:
        raise SkyError(f"cannot read image {path}: {exc}", "check the field's final products") from None
    hdu = hdul[0]
    if hdu.data is None or hdu.data.ndim < 2:
        raise SkyError(f"image {path} has no 2-D data", "check the field's final products")
    data = hdu.data[(0,) * (hdu.data.ndim - 2)]
    return data, WCS(hdu.header).celestial, hdu.header


def clipped_rms(data: np.ndarray, box: int = 1000) -> float:
    """Rms of the central ``box`` pixels, iteratively clipped at 5 sigma about zero until it
    converges (astropy's sigma_clip, centred on 0 as ddf-pipeline's get_rms is)."""
    from astropy.stats import sigma_clip
    ny, nx = data.shape
    y0, x0 = max(0, ny // 2 - box // 2), max(0, nx // 2 - box // 2)
    x = np.asarray(data[y0:y0 + box, x0:x0 + box], dtype=np.float32)
    x = x[np.isfinite(x)]
    if x.size < 10:
        raise SkyError("the central box of the image has no finite pixels",
                       "give the noise explicitly (--noise FIELD=JY)")
    def zero(a: np.ndarray, axis: Any = None) -> float:
        return 0.0
    def rms(a: np.ndarray, axis: Any = None) -> float:
        return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))
    kept = sigma_clip(x, sigma=5.0, maxiters=None, cenfunc=zero, stdfunc=rms, masked=False)
    value = rms(kept)
    if not value > 0:
        raise SkyError("the clipped rms of the image is zero", "give the noise explicitly (--noise FIELD=JY)")
    return value
