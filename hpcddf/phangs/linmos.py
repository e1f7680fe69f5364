"""The linear mosaic of the postprocessed parts of a PHANGS mosaic (:func:`linear_mosaic`).

PHANGS combines the postprocessed parts of a mosaic in CASA (imsmooth, imregrid, LEL). Here it
is numpy on the parts' FITS products (radio_beam, spectral_cube and reproject, as the derived
products): no CASA session, and the arithmetic can be tested on synthetic cubes with a known
truth. The parts arrive in K at a round beam, trimmed to their pb cutoff (NaN outside it).
Called by the postprocess runner (:mod:`hpcddf.phangs.run_casa_stages`) once every part is
postprocessed.
"""

from __future__ import annotations

import math
from typing import Any

from hpcddf.phangs.run_common import PhangsRunError

MOSAIC_PRODUCTS = ("pbcorr_trimmed_k", "flat_trimmed_k", "pb_trimmed")


def mosaic_weights(pb: Any, sigma: float) -> Any:
    """PHANGS's interferometric weight w = pb²/σ²: the inverse variance of a pb-corrected
    part whose flat-noise σ grows as σ/pb. Blank or non-positive pb weighs 0."""
    import numpy as np

    pb = np.asarray(pb, dtype=float)
    return np.where(np.isfinite(pb) & (pb > 0), pb, 0.0) ** 2 / sigma ** 2


def cube_noise(flat: Any) -> float:
    """σ of a flat-noise cube as PHANGS weights mosaic parts: 'chauvmad' (the std of what
    Chauvenet's criterion keeps around a MAD start) per channel, the median over channels.
    Faint emission wings survive the clipping and raise it by a few per cent in line
    channels; the weights only need the parts' noise relative to each other. A 2-D image
    (a continuum part) is one plane: its σ is its chauvmad noise."""
    import numpy as np

    from hpcddf.phangs.casa_common import chauvenet_mad_noise

    flat = np.asarray(flat, dtype=float)
    values = [chauvenet_mad_noise(ch) for ch in flat.reshape((-1, *flat.shape[-2:]))
              if np.isfinite(ch).sum() >= 10]
    values = [v for v in values if v > 0]
    if not values:
        raise PhangsRunError("cannot measure the noise of a mosaic part: no channel has 10 "
                             "finite pixels that vary", "check the part's flat_trimmed_k cube")
    return float(np.median(values))


def common_grid(headers: list[Any]) -> tuple[Any, tuple[int, int]]:
    """The first part's celestial grid (projection, tangent point, pixel size) widened to hold
    every part's outline; (2-D WCS, (ny, nx)). Parts imaged on one phase centre and cell land
    on whole-pixel shifts of it, so aligning them moves no flux."""
    import numpy as np
    from astropy.wcs import WCS

    ref = WCS(headers[0]).celestial
    xs, ys = [], []
    for h in headers:
        w = WCS(h).celestial
        nx, ny = int(h["NAXIS1"]), int(h["NAXIS2"])
        ex, ey = np.linspace(-0.5, nx - 0.5, 2 * nx + 1), np.linspace(-0.5, ny - 0.5, 2 * ny + 1)
        px = np.concatenate([ex, ex, np.full_like(ey, -0.5), np.full_like(ey, nx - 0.5)])
        py = np.concatenate([np.full_like(ex, -0.5), np.full_like(ex, ny - 0.5), ey, ey])
        rx, ry = ref.world_to_pixel_values(*w.pixel_to_world_values(px, py))
        xs.append(rx)
        ys.append(ry)
    x, y = np.concatenate(xs), np.concatenate(ys)
    x0, x1 = int(np.floor(x.min() + 0.5 + 1e-6)), int(np.ceil(x.max() - 0.5 - 1e-6))
    y0, y1 = int(np.floor(y.min() + 0.5 + 1e-6)), int(np.ceil(y.max() - 0.5 - 1e-6))
    out = ref.deepcopy()
    out.wcs.crpix = [ref.wcs.crpix[0] - x0, ref.wcs.crpix[1] - y0]
    return out, (y1 - y0 + 1, x1 - x0 + 1)


def _whole_pixel_shift(wcs: Any, grid: Any, header: Any) -> bool:
    """Whether the part's pixels are the grid's shifted by whole pixels (same projection,
    tangent point and cell: the parts of a mosaic imaged on one phase centre)."""
    import numpy as np

    nx, ny = int(header["NAXIS1"]), int(header["NAXIS2"])
    px, py = np.array([0.0, nx - 1.0, 0.0]), np.array([0.0, 0.0, ny - 1.0])
    gx, gy = grid.world_to_pixel_values(*wcs.pixel_to_world_values(px, py))
    dx, dy = gx - px, gy - py
    return bool(np.all(np.abs(dx - np.round(dx[0])) < 1e-3)
                and np.all(np.abs(dy - np.round(dy[0])) < 1e-3))


def channel_axis(header: Any) -> Any:
    """World value of each channel (m/s for the exported VRAD axis)."""
    import numpy as np
    from astropy.wcs import WCS

    return np.asarray(WCS(header).spectral.pixel_to_world_values(np.arange(header["NAXIS3"])))


def on_channels(data: Any, v_in: Any, v_out: Any) -> Any:
    """``data`` [chan, y, x] linearly interpolated from channels ``v_in`` onto ``v_out`` (both
    uniform, same width); NaN outside. The identity when the axes agree (the usual case: the
    parts of a product share its channel grid)."""
    import numpy as np

    v_in, v_out = np.asarray(v_in, float), np.asarray(v_out, float)
    dv_in, dv_out = v_in[1] - v_in[0], v_out[1] - v_out[0]
    if v_in.size == v_out.size and np.allclose(v_in, v_out, atol=1e-3 * abs(dv_out)):
        return data
    if not math.isclose(abs(dv_in), abs(dv_out), rel_tol=0.01):
        raise PhangsRunError(f"mosaic parts have different channel widths ({abs(dv_in):g} and "
                             f"{abs(dv_out):g})", "image every part with the product's "
                                                  "channel width")
    f = (v_out - v_in[0]) / dv_in
    out = np.full((v_out.size,) + data.shape[1:], np.nan)
    for k, fk in enumerate(f):
        i = int(np.floor(fk + 1e-9))
        t = fk - i
        if 0 <= i < v_in.size - 1:
            out[k] = (1.0 - t) * data[i] + t * data[i + 1]
        elif abs(fk - (v_in.size - 1)) < 1e-9:
            out[k] = data[-1]
    return out


def _common_beam(headers: list[Any]) -> Any:
    """The smallest beam every part can be convolved to: for round parts the largest."""
    import astropy.units as u
    from radio_beam import Beams

    beams = Beams(major=[h["BMAJ"] for h in headers] * u.deg,
                  minor=[h["BMIN"] for h in headers] * u.deg,
                  pa=[h.get("BPA", 0.0) for h in headers] * u.deg)
    if all(math.isclose(h["BMAJ"], h["BMIN"], rel_tol=1e-6) for h in headers):
        return beams[int(beams.major.argmax())]
    return beams.common_beam()


def _read_part(path: str) -> Any:
    """A part's product as a ``SpectralCube``, or for a 2-D continuum image a spectral-cube
    ``Projection``: both carry the beam and convolve to another one the same way."""
    from astropy.io import fits
    from spectral_cube import Projection

    from hpcddf.phangs.convolution import read_cube
    if int(fits.getheader(path)["NAXIS"]) != 2:
        return read_cube(path)
    with fits.open(path, memmap=False) as hdul:
        return Projection.from_hdu(hdul[0])


def _planes(image: Any) -> Any:
    """The values of a cube or an image as planes [chan, y, x] (an image is one plane)."""
    import numpy as np

    values = image.unmasked_data[:] if hasattr(image, "unmasked_data") else image
    data = np.asarray(values.value, dtype=float)
    return data.reshape((-1, *data.shape[-2:]))


def _part_on_beam(path: str, beam: Any) -> Any:
    """A part's planes [chan, y, x] (K) at ``beam`` (a 2-D image is one plane), convolved
    only when its own beam is finer (a K map is a surface brightness, so the kernel is
    normalised, no beam-area factor)."""
    import warnings

    import numpy as np

    image = _read_part(path)
    data = _planes(image)
    own = image.beam
    if float(own.major.to("arcsec").value) < float(beam.major.to("arcsec").value) * (1 - 1e-4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv = image.convolve_to(beam, nan_treatment="interpolate")
        blank = ~np.isfinite(data)
        data = _planes(conv)
        data[blank] = np.nan
    return data


def linear_mosaic(parts: list[dict[str, str]], out: dict[str, str], name: str | None = None
                  ) -> dict[str, Any]:
    """Mosaic of parts (each a dict of its MOSAIC_PRODUCTS paths) into ``out`` (same keys);
    ``name`` becomes the headers' OBJECT. The parts are all cubes [chan, y, x] or all 2-D
    images (continuum: one plane, no spectral axis; the mosaic is 2-D with the first part's
    cards, its FREQ among them).

    1. Common resolution: the largest part beam; finer parts are convolved to it.
    2. Common grid: :func:`common_grid`; the spectral axis is the first part's (others are
       interpolated onto it, :func:`on_channels`).
    3. Weights w_i = pb_i²/σ_i² (:func:`mosaic_weights`), σ_i from the part's flat cube at the
       common beam (:func:`cube_noise`); blank pixels weigh 0; I = Σ w_i I_i / Σ w_i.
    4. ``pb_trimmed`` of the mosaic is its relative sensitivity sqrt(Σw / max Σw) per channel:
       the pb-corrected mosaic's noise is 1/sqrt(Σw), so this plays the single pointing's pb
       (1 at the best point, and ``flat_trimmed_k`` = mosaic x it has flat noise, as for a
       single field; it exceeds a part's pb where parts overlap).
    5. Trimmed to the pixels the mosaic covers (plus two), written atomically.

    Accumulates part by part, so memory holds the mosaic grid and one part."""
    import numpy as np
    from astropy.io import fits
    from astropy.wcs import WCS
    from reproject import reproject_interp

    headers = [fits.getheader(p["pbcorr_trimmed_k"]) for p in parts]
    images = _parts_are_images(headers)
    beam = _common_beam(headers)
    grid, shape2d = common_grid(headers)
    v_out = None if images else channel_axis(headers[0])
    nplanes = 1 if v_out is None else v_out.size
    num = np.zeros((nplanes, *shape2d))
    wsum = np.zeros_like(num)
    sigmas = []
    for part, header in zip(parts, headers, strict=True):
        cube = _part_on_beam(part["pbcorr_trimmed_k"], beam)
        flat = _part_on_beam(part["flat_trimmed_k"], beam)
        pb = fits.getdata(part["pb_trimmed"]).astype(float).reshape(cube.shape)
        if v_out is not None:
            v_in = channel_axis(header)
            cube, flat, pb = (on_channels(a, v_in, v_out) for a in (cube, flat, pb))
        sigmas.append(cube_noise(flat))
        w = np.where(np.isfinite(cube), mosaic_weights(pb, sigmas[-1]), 0.0)
        celestial = WCS(header).celestial
        shape = (nplanes, *shape2d)
        # a whole-pixel shift is copied (bilinear weights of ~0 would still spread blanks)
        order = "nearest-neighbor" if _whole_pixel_shift(celestial, grid, header) else "bilinear"
        cube_r, _ = reproject_interp((cube, celestial), grid, shape_out=shape, order=order)
        w_r, _ = reproject_interp((w, celestial), grid, shape_out=shape, order=order)
        w_r = np.where(np.isfinite(cube_r) & np.isfinite(w_r), w_r, 0.0)
        num += w_r * np.nan_to_num(cube_r)
        wsum += w_r
    with np.errstate(invalid="ignore", divide="ignore"):
        mosaic = np.where(wsum > 0, num / wsum, np.nan)
        peak = wsum.reshape(wsum.shape[0], -1).max(axis=1)[:, None, None]
        coverage = np.where(wsum > 0, np.sqrt(wsum / np.where(peak > 0, peak, np.nan)), np.nan)
    ys, xs = np.nonzero(np.isfinite(mosaic).any(axis=0))
    if ys.size == 0:
        raise PhangsRunError("the mosaic parts share no finite pixel", "check the parts' cubes")
    y0, y1 = max(0, ys.min() - 2), min(shape2d[0], ys.max() + 3)
    x0, x1 = max(0, xs.min() - 2), min(shape2d[1], xs.max() + 3)
    header = _mosaic_header(headers[0], grid, x0, y0, beam, len(parts), sigmas)
    if name:
        header["OBJECT"] = name
    products = {"pbcorr_trimmed_k": mosaic, "flat_trimmed_k": mosaic * coverage,
                "pb_trimmed": coverage}
    for key, data in products.items():
        box = data[:, y0:y1, x0:x1]
        _write_mosaic_product(out[key], box[0] if images else box, header, key)
    shape_out = [int(y1 - y0), int(x1 - x0)] if images else [nplanes, int(y1 - y0), int(x1 - x0)]
    return {"fits": dict(out), "beam_arcsec": float(beam.major.to("arcsec").value),
            "noise_k": sigmas, "shape": shape_out}


def _parts_are_images(headers: list[Any]) -> bool:
    """Whether the mosaic parts are 2-D images (continuum) rather than cubes; a mix of the
    two, or another dimensionality, has no one mosaic."""
    dims = sorted({int(h["NAXIS"]) for h in headers})
    if len(dims) != 1 or dims[0] not in (2, 3):
        raise PhangsRunError(f"mosaic parts have {' and '.join(map(str, dims))} axes: they "
                             f"must all be 2-D images or all cubes",
                             "postprocess every part of the mosaic as the same product")
    return dims == [2]


def _mosaic_header(first: Any, grid: Any, x0: int, y0: int, beam: Any, nparts: int,
                   sigmas: list[float]) -> Any:
    """The first part's header on the trimmed mosaic grid, with the common beam."""
    header = first.copy()
    header["CRPIX1"] = float(grid.wcs.crpix[0] - x0)
    header["CRPIX2"] = float(grid.wcs.crpix[1] - y0)
    beam.attach_to_header(header, copy=False)
    header["HISTORY"] = (f"hpcddf linear mosaic of {nparts} parts, weights pb^2/sigma^2, "
                         f"sigma (K) " + ", ".join(f"{s:.4g}" for s in sigmas))
    return header


def _write_mosaic_product(path: str, data: Any, header: Any, key: str) -> None:
    import numpy as np

    from hpcddf.phangs.convolution import set_data_range, write_fits_atomic
    h = header.copy()
    if key == "pb_trimmed":
        h["BUNIT"] = ""
        h["BTYPE"] = "Coverage"
        h["COMMENT"] = "relative sensitivity sqrt(sum w / max sum w) of the linear mosaic"
    data = data.astype(np.float32)
    set_data_range(h, data)
    write_fits_atomic(path, data, h)
