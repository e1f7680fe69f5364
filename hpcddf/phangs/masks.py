"""Signal masks for PHANGS moment maps: strict (high confidence), broad (union over resolutions)
and flat (a velocity window around a known velocity field).

The strict mask is a two-threshold ("CPROPS") mask: seeds where S/N ≥ 4 in at least 2
consecutive channels, grown into the connected regions where S/N ≥ 2 in at least 2 consecutive
channels. Requiring consecutive channels suppresses single-channel noise spikes; requiring a
seed keeps only low-S/N regions that contain a convincing detection.

The broad mask joins the strict masks made at every resolution (and of linked configurations),
so faint extended emission found only after smoothing is included at full resolution.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from hpcddf.errors import ConfigError
from hpcddf.phangs.convolution import (
    PathLike,
    pixels_per_beam,
    read_array,
    read_cube,
    write_fits_atomic,
)

JOIN_OPERATIONS = ("sum", "or", "and")
BROAD_RECIPES = ("anyscale", "somescales")


# ---------------------------------------------------------------- array algorithms

def nchan_thresh_mask(snr: np.ndarray, thresh: float, nchan: int) -> np.ndarray:
    """S/N ≥ thresh, keeping only voxels inside a spectral run of ≥ ``nchan`` channels."""
    above = np.nan_to_num(np.asarray(snr, dtype=float), nan=-np.inf) >= thresh
    if nchan <= 1:
        return above
    return ndimage.binary_opening(above, structure=np.ones((int(nchan), 1, 1), bool))


def reject_small_regions(mask: np.ndarray, min_volume: float = 0,
                         min_area: float = 0) -> np.ndarray:
    """Drop connected regions (face connectivity) with fewer than ``min_volume`` voxels or a
    projected (y, x) footprint of fewer than ``min_area`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    if not (min_volume or min_area) or not mask.any():
        return mask
    labels, nlab = ndimage.label(mask)
    volume = np.bincount(labels.ravel(), minlength=nlab + 1)
    _, ny, nx = mask.shape
    lab = labels[mask].astype(np.int64)
    pix = np.nonzero(mask)
    flat_xy = pix[1].astype(np.int64) * nx + pix[2]
    pairs = np.unique(lab * (ny * nx) + flat_xy)
    area = np.bincount(pairs // (ny * nx), minlength=nlab + 1)
    keep = (volume >= (min_volume or 0)) & (area >= (min_area or 0))
    keep[0] = False
    return keep[labels]


def grow_mask(mask: np.ndarray, iters_xy: int = 0, iters_v: int = 0) -> np.ndarray:
    """Dilate in (y, x) by a cross ``iters_xy`` times, and along v by a line of ``iters_v``
    channels (scipy centres it: an odd length L grows (L−1)/2 channels each side); with both,
    the union of the two dilations of the original mask."""
    mask = np.asarray(mask, dtype=bool)
    out = mask.copy()
    if iters_xy and iters_xy > 0:
        cross = ndimage.generate_binary_structure(2, 1)[np.newaxis]
        out |= ndimage.binary_dilation(mask, structure=cross, iterations=int(iters_xy))
    if iters_v and iters_v > 1:
        out |= ndimage.binary_dilation(mask, structure=np.ones((int(iters_v), 1, 1), bool))
    return out


def cprops_mask(data: np.ndarray, noise: np.ndarray, hi_thresh: float = 4.0,
                hi_nchan: int = 2, lo_thresh: float | None = None, lo_nchan: int | None = None,
                min_pix: float | None = None, min_area: float | None = None,
                min_beams: float | None = None, ppbeam: float | None = None,
                grow_xy: int = 0, grow_v: int = 0, prior_hi: np.ndarray | None = None,
                prior_lo: np.ndarray | None = None) -> np.ndarray:
    """The two-threshold mask (module docstring); returns a bool cube."""
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.asarray(data, dtype=float) / np.asarray(noise, dtype=float)
    lo_thresh = hi_thresh if lo_thresh is None else lo_thresh
    lo_nchan = hi_nchan if lo_nchan is None else lo_nchan
    hi = nchan_thresh_mask(snr, hi_thresh, hi_nchan)
    min_volume = min_pix if min_pix is not None else (
        min_beams * ppbeam if min_beams is not None and ppbeam is not None else 0)
    hi = reject_small_regions(hi, min_volume=min_volume, min_area=min_area or 0)
    if prior_hi is not None:
        hi &= np.asarray(prior_hi, dtype=bool)
    lo = nchan_thresh_mask(snr, lo_thresh, lo_nchan)
    if prior_lo is not None:
        lo &= np.asarray(prior_lo, dtype=bool)
    labels, nlab = ndimage.label(lo)
    seeded = np.zeros(nlab + 1, bool)
    seeded[np.unique(labels[hi])] = True
    seeded[0] = False
    return grow_mask(seeded[labels], grow_xy, grow_v)


# ---------------------------------------------------------------- strict mask on files

def _grid_header(header: Any) -> Any:
    """A clean 3-D header (celestial + spectral WCS, beam, object) for masks on this grid."""
    from astropy.wcs import WCS

    out = WCS(header, naxis=3).to_header()
    for key in ("BMAJ", "BMIN", "BPA", "OBJECT"):
        if key in header:
            out[key] = header[key]
    return out


def _check_units(cube: Any, noise_header: Any, noise_path: PathLike) -> None:
    import astropy.units as u

    unit = noise_header.get("BUNIT", "").strip()
    if not unit or cube.unit == u.one:
        return
    try:
        same = u.Unit(unit, parse_strict="silent") == cube.unit
    except ValueError:
        same = False
    if not same:
        raise ConfigError(f"noise cube {noise_path} is in {unit!r}, the cube in {cube.unit}",
                          "make the noise cube from this cube")


def strict_mask(cube_path: PathLike, noise_path: PathLike, coverage_path: PathLike | None = None,
                *, out_path: PathLike, hi_thresh: float = 4.0, hi_nchan: int = 2,
                lo_thresh: float = 2.0, lo_nchan: int = 2, min_pix: float | None = None,
                min_area: float | None = None, min_beams: float | None = None,
                grow_xy: int = 0, grow_v: int = 0, coverage_thresh: float = 0.95) -> Path:
    """Write the uint8 ``*_strictmask.fits`` of a cube and its noise cube.

    Seeds are only taken where the convolution coverage exceeds ``coverage_thresh`` (edges
    blurred with blank sky are not trusted).
    """
    cube = read_cube(cube_path)
    data = np.asarray(cube.unmasked_data[:].value, dtype=np.float64)
    noise, nheader = read_array(noise_path)
    if noise.shape != data.shape:
        raise ConfigError(f"noise cube {noise_path} has shape {noise.shape}, the cube "
                          f"{cube_path} {data.shape}", "make the noise cube from this cube")
    _check_units(cube, nheader, noise_path)
    prior_hi = None
    if coverage_path is not None:
        cov, _ = read_array(coverage_path)
        if cov.shape != data.shape:
            raise ConfigError(f"coverage cube {coverage_path} has shape {cov.shape}, the cube "
                              f"{cube_path} {data.shape}", "use the coverage of this cube")
        prior_hi = np.nan_to_num(cov.astype(np.float64)) > coverage_thresh
    header = cube.header
    mask = cprops_mask(data, noise, hi_thresh=hi_thresh, hi_nchan=hi_nchan,
                       lo_thresh=lo_thresh, lo_nchan=lo_nchan, min_pix=min_pix,
                       min_area=min_area, min_beams=min_beams,
                       ppbeam=pixels_per_beam(header) if min_beams is not None else None,
                       grow_xy=grow_xy, grow_v=grow_v, prior_hi=prior_hi)
    return write_fits_atomic(out_path, mask.astype(np.uint8), _grid_header(header))


# ---------------------------------------------------------------- joining masks across grids

def _header_of(template: Any) -> Any:
    from astropy.io import fits

    if isinstance(template, (str, Path)):
        if not Path(template).is_file():
            raise ConfigError(f"template {template} does not exist",
                              "make the native-resolution cube first")
        return fits.getheader(template)
    return template


def _shape_of(header: Any) -> tuple[int, int, int]:
    return (int(header["NAXIS3"]), int(header["NAXIS2"]), int(header["NAXIS1"]))


def _same_grid(wcs_a: Any, shape_a: tuple, wcs_b: Any, shape_b: tuple) -> bool:
    return shape_a == shape_b and bool(wcs_a.wcs.compare(wcs_b.wcs, tolerance=1e-9))


def _index_map(template_wcs: Any, shape: tuple[int, int, int], wcs: Any,
               mshape: tuple[int, ...], path: PathLike) -> tuple[np.ndarray, ...]:
    """Nearest pixel of the mask for every template voxel, through world coordinates (the
    celestial and spectral axes are separable in these cubes); -1 where it falls outside."""
    nz, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sky = template_wcs.celestial.pixel_to_world(xx, yy)
            mx, my = wcs.celestial.world_to_pixel(sky)
            spec = template_wcs.spectral.pixel_to_world(np.arange(nz))
            mz = wcs.spectral.world_to_pixel(spec)
    except Exception as exc:
        raise ConfigError(f"cannot map the template grid onto mask {path}: {exc}",
                          "masks must share a spectral axis type or carry RESTFRQ") from exc
    idx = []
    for pix, n in ((np.asarray(mz), mshape[0]), (np.asarray(my), mshape[1]),
                   (np.asarray(mx), mshape[2])):
        i = np.full(pix.shape, -1, dtype=np.int64)
        ok = np.isfinite(pix)
        r = np.rint(np.where(ok, pix, -1)).astype(np.int64)
        inside = ok & (r >= 0) & (r < n)
        i[inside] = r[inside]
        idx.append(i)
    return tuple(idx)


def _resampled(mask: np.ndarray, idx: tuple[np.ndarray, ...]) -> np.ndarray:
    iz, iy, ix = idx
    out = mask[np.clip(iz, 0, None)[:, None, None], np.clip(iy, 0, None)[None],
               np.clip(ix, 0, None)[None]]
    outside = (iz < 0)[:, None, None] | ((iy < 0) | (ix < 0))[None]
    return out & ~outside


def join_masks(template_header: Any, mask_paths: Sequence[PathLike],
               operation: str = "sum") -> np.ndarray:
    """Combine masks onto the template's grid (nearest neighbour through world coordinates,
    unless the grids are identical). A mask voxel counts where its value exceeds 0.5.

    ``sum``: how many masks include each voxel (int); ``or``/``and``: bool.
    """
    from astropy.wcs import WCS

    if operation not in JOIN_OPERATIONS:
        raise ConfigError(f"unknown mask join operation {operation!r}",
                          f"use one of {', '.join(JOIN_OPERATIONS)}")
    header = _header_of(template_header)
    shape = _shape_of(header)
    twcs = WCS(header, naxis=3)
    total = np.zeros(shape, dtype=np.int32)
    for path in mask_paths:
        data, mheader = read_array(path)
        mask = np.nan_to_num(data.astype(np.float64)) > 0.5
        mwcs = WCS(mheader, naxis=3)
        if not _same_grid(twcs, shape, mwcs, mask.shape):
            mask = _resampled(mask, _index_map(twcs, shape, mwcs, mask.shape, path))
        total += mask
    if operation == "or":
        return total > 0
    if operation == "and":
        return total == len(mask_paths)
    return total


def broad_mask(template_path: PathLike, mask_paths: Sequence[PathLike], *, out_path: PathLike,
               recipe: str = "anyscale", fraction: float = 0.25, grow_xy: int = 0,
               grow_v: int = 0) -> Path:
    """Write the uint8 ``*_broadmask.fits`` on the template's grid.

    ``anyscale``: a voxel is in if any strict mask has it; ``somescales``: if more than
    ``fraction`` of the masks have it.
    """
    if recipe not in BROAD_RECIPES:
        raise ConfigError(f"unknown broad-mask recipe {recipe!r}",
                          f"use one of {', '.join(BROAD_RECIPES)} in broadmask_kw")
    if not mask_paths:
        raise ConfigError("no strict masks to join into a broad mask",
                          "make the strict masks first")
    header = _header_of(template_path)
    total = join_masks(header, mask_paths, "sum")
    limit = 0 if recipe == "anyscale" else fraction * len(mask_paths)
    mask = grow_mask(total > limit, grow_xy, grow_v)
    return write_fits_atomic(out_path, mask.astype(np.uint8), _grid_header(header))


# ---------------------------------------------------------------- flat masks

def window_kms(value: float | str | Any) -> float:
    """A velocity window in km/s from a number (km/s), a Quantity or a string like '30km/s'
    (the form the window key stores)."""
    import astropy.units as u

    try:
        quantity = u.Quantity(value)
        if quantity.unit == u.one:
            quantity = quantity.value * (u.km / u.s)
        width = float(quantity.to(u.km / u.s).value)
    except (ValueError, TypeError, u.UnitsError) as exc:
        raise ConfigError(f"velocity window {value!r} is not a velocity",
                          "write it as '<number>km/s' in the window key") from exc
    if not width > 0:
        raise ConfigError(f"velocity window {value!r} must be positive",
                          "fix the window key entry")
    return float(width)


def _vfield_on_cube(vfield_path: PathLike, cube: Any) -> np.ndarray:
    """The velocity field (km/s) reprojected bilinearly onto the cube's sky grid."""
    import astropy.units as u
    from reproject import reproject_interp

    vf, vheader = read_array(vfield_path, ndim=2)
    unit = u.Unit(vheader.get("BUNIT", "km/s").strip() or "km/s", parse_strict="silent")
    try:
        scale = unit.to(u.km / u.s)
    except u.UnitsError as exc:
        raise ConfigError(f"velocity field {vfield_path} is in {unit}, not a velocity",
                          "pass a mom1/vfield map in km/s") from exc
    from astropy.wcs import WCS

    celestial = cube.wcs.celestial
    out, _ = reproject_interp((vf.astype(np.float64) * scale, WCS(vheader).celestial),
                              celestial, shape_out=cube.shape[1:], order="bilinear")
    return out


def velocity_axis_kms(cube: Any) -> np.ndarray:
    """The cube's spectral axis in km/s (radio convention when it is a frequency axis)."""
    import astropy.units as u

    try:
        if cube.spectral_axis.unit.is_equivalent(u.km / u.s):
            return np.asarray(cube.spectral_axis.to(u.km / u.s).value, dtype=np.float64)
        return np.asarray(cube.with_spectral_unit(u.km / u.s, velocity_convention="radio")
                          .spectral_axis.value, dtype=np.float64)
    except Exception as exc:
        raise ConfigError(f"cannot express the spectral axis of the cube in km/s ({exc})",
                          "the cube header needs RESTFRQ for a frequency axis") from exc


def flat_mask(cube_path: PathLike, vfield_path: PathLike, *, out_path: PathLike,
              window: float | str = 50.0, mask_path: PathLike | None = None) -> Path:
    """Write a uint8 flat mask: |v − v_field(x, y)| ≤ window/2, OR'ed with ``mask_path``.

    Reference quirk: PHANGS' task passes the window key's value as ``v_window`` while its
    recipe reads ``window``, so the default 50 km/s was always used. Fixed here because there
    is one parameter, ``window``: the caller passes the window key's value (a number in km/s
    or its '<w>km/s' string) and it is what is used.
    """
    width = window_kms(window)
    cube = read_cube(cube_path)
    v = velocity_axis_kms(cube)
    vfield = _vfield_on_cube(vfield_path, cube)
    with np.errstate(invalid="ignore"):
        mask = np.abs(v[:, None, None] - vfield[None]) <= 0.5 * width
    header = cube.header
    if mask_path is not None:
        mask |= join_masks(header, [mask_path], "or")
    return write_fits_atomic(out_path, mask.astype(np.uint8), _grid_header(header))
