"""Noise cubes: σ(z, y, x) = σ_map(y, x) · σ_spec(z), estimated robustly from the data itself.

Interferometric cubes have noise that varies across the field (primary-beam correction, mosaic
overlaps) and along the band (atmosphere, band edges). PHANGS models it as a smooth spatial map
times a smooth spectral profile:

* σ_map: a zero-centred MAD (:func:`mad_zero_centered`) in boxes of ``box`` pixels sampled on a
  grid, filled in between by normalised convolution with a Gaussian of FWHM ``box``;
* σ_spec: the same statistic over slabs of ``spec_box`` channels of data/σ_map, smoothed with a
  Savitzky–Golay filter and normalised to a median of 1;
* ``iterations`` > 1 repeats on data/σ and multiplies the results, so each pass estimates what
  the previous one left over.

The zero-centred MAD trusts the *negative* half of the data: emission is positive, so the
negatives of a signal-bearing region still measure the noise. A first guess σ1 comes from the
median of the negatives; values above z_f·σ1 (z_f: the level one noise voxel in N would reach)
are dropped, and σ is 1.4826 × the median |x| of the rest.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.signal import savgol_coeffs
from scipy.stats import norm

from hpcddf.errors import ConfigError
from hpcddf.phangs.convolution import (
    PathLike,
    pixels_per_beam,
    read_array,
    read_cube,
    set_data_range,
    write_fits_atomic,
)

MAD_TO_SIGMA = 1.4826
FWHM_TO_SIGMA = 1.0 / math.sqrt(8.0 * math.log(2.0))


def mad_zero_centered(x: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Robust σ of zero-mean noise with positive signal in it (see the module docstring)."""
    x = np.asarray(x)
    valid = np.isfinite(x) if mask is None else (np.asarray(mask, dtype=bool) & np.isfinite(x))
    vals = x[valid]
    negatives = vals[vals < 0]
    if negatives.size == 0:
        return math.nan
    sigma1 = MAD_TO_SIGMA * abs(float(np.median(negatives)))
    z_f = norm.isf(0.5 / vals.size)
    kept = vals[vals < z_f * sigma1]
    return MAD_TO_SIGMA * float(np.median(np.abs(kept)))


def _mad_zero_centered_spectra(data: np.ndarray, valid: np.ndarray, n_thresh: int) -> np.ndarray:
    """:func:`mad_zero_centered` of every spectrum at once (``box=None``: no spatial sharing)."""
    count = valid.sum(axis=0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        negatives = np.where(valid & (data < 0), data, np.nan)
        sigma1 = MAD_TO_SIGMA * np.abs(np.nanmedian(negatives, axis=0))
        z_f = norm.isf(0.5 / np.maximum(count, 1))
        kept = np.where(valid & (data < z_f * sigma1), np.abs(data), np.nan)
        sigma = MAD_TO_SIGMA * np.nanmedian(kept, axis=0)
    sigma[count <= n_thresh] = np.nan
    return sigma


def _sample_axis(n: int, halfbox: int, step: int) -> np.ndarray:
    return np.arange(min(halfbox, n - 1), n, step)


def _spatial_map(data: np.ndarray, valid: np.ndarray, n_thresh: int, box: int | None,
                 substride: int) -> np.ndarray:
    """σ_map on a grid of box samples, filled by normalised Gaussian convolution."""
    from astropy.convolution import Gaussian2DKernel, convolve_fft

    if box is None:
        return _mad_zero_centered_spectra(data, valid, n_thresh)
    _, ny, nx = data.shape
    pixdim = math.ceil(math.sqrt(int(valid.any(axis=0).sum())))
    step = max(1, min(int(box / 2.5), pixdim // 20))
    half = box // 2
    sampled = np.full((ny, nx), np.nan)
    for y in _sample_axis(ny, half, step):
        ys = slice(max(y - half, 0), y + half + 1, substride)
        for x in _sample_axis(nx, half, step):
            sl = (slice(None), ys, slice(max(x - half, 0), x + half + 1, substride))
            good = valid[sl]
            if int(good.sum()) > n_thresh:
                sampled[y, x] = mad_zero_centered(data[sl], good)
    if not np.isfinite(sampled).any():
        return sampled
    padded = np.pad(sampled, box, mode="edge")
    kernel = Gaussian2DKernel(box * FWHM_TO_SIGMA)
    filled = convolve_fft(padded, kernel, nan_treatment="interpolate", boundary="wrap",
                          normalize_kernel=True, preserve_nan=False, allow_huge=True)
    return filled[box:box + ny, box:box + nx]


def _spectral_profile(scaled: np.ndarray, valid: np.ndarray, n_thresh: int,
                      spec_box: int | None, window: int | None, order: int) -> np.ndarray:
    """σ_spec(z) of data already divided by σ_map, smoothed and normalised to median 1."""
    from astropy.convolution import convolve

    nz = scaled.shape[0]
    half = (spec_box or 1) // 2
    spec = np.full(nz, np.nan)
    for z in range(nz):
        sl = slice(max(z - half, 0), z + half + 1)
        good = valid[sl] & np.isfinite(scaled[sl])
        if int(good.sum()) > n_thresh:
            spec[z] = mad_zero_centered(scaled[sl], good)
    blank = ~np.isfinite(spec)
    if blank.all():
        return spec
    window = _odd_window(window, nz, order)
    if window is not None:
        coeffs = savgol_coeffs(window, order)
        spec = convolve(spec, coeffs, nan_treatment="interpolate", boundary="extend",
                        normalize_kernel=True)
        spec[blank] = np.nan
    return spec / np.nanmedian(spec)


def _odd_window(window: int | None, nz: int, order: int) -> int | None:
    """The Savitzky–Golay window, made odd and no longer than the spectrum (None: no smoothing)."""
    if window is None:
        return None
    window = min(int(window), nz)
    if window % 2 == 0:
        window -= 1
    return window if window > order else None


def noise_cube(data: np.ndarray, mask: np.ndarray | None = None, n_thresh: int = 30,
               iterations: int = 1, box: int | None = None, spec_box: int | None = None,
               substride: int = 1, bandpass_smooth_window: int | None = None,
               bandpass_smooth_order: int = 3, *,
               footprint: np.ndarray | None = None) -> np.ndarray:
    """σ(z, y, x) of ``data`` (nz, ny, nx); ``mask`` marks signal voxels to leave out.

    ``footprint`` (ny, nx) is where the result is defined (default: spectra with any finite
    value); it lets :func:`phangs_noise` estimate on NaN-dilated data yet cover every measured
    pixel. The result is NaN outside it and on channels without enough noise voxels.
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"noise_cube needs a 3-D array, got shape {data.shape}")
    signal = np.zeros(data.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if footprint is None:
        footprint = np.isfinite(data).any(axis=0)
    sigma = np.ones(data.shape)
    for _ in range(max(1, int(iterations))):
        scaled = data / sigma
        valid = np.isfinite(scaled) & ~signal
        smap = _spatial_map(scaled, valid, n_thresh, box, max(1, int(substride)))
        smap[~footprint] = np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            sspec = _spectral_profile(scaled / smap, valid, n_thresh, spec_box,
                                      bandpass_smooth_window, bandpass_smooth_order)
        sigma = sigma * (smap[np.newaxis] * sspec[:, np.newaxis, np.newaxis])
    return sigma


def dilate_nans(data: np.ndarray) -> np.ndarray:
    """Blank every voxel touching a NaN (3-D, connectivity 2): edges of mosaics and of the
    primary-beam-corrected field have inflated noise that would bias the estimate."""
    blank = ~np.isfinite(data)
    if not blank.any():
        return data
    grown = ndimage.binary_dilation(blank, structure=ndimage.generate_binary_structure(3, 2))
    return np.where(grown, np.nan, data)


def phangs_noise(cube_path: PathLike, out_path: PathLike, *,
                 signal_mask_path: PathLike | None = None, iterations: int = 4,
                 n_thresh: int = 30, spec_box: int = 5, box: int | None = None,
                 substride: int | None = None, bandpass_smooth_window: int | None = None,
                 bandpass_smooth_order: int = 3) -> Path:
    """Write ``cube_path``'s noise cube to ``out_path`` (``*_noise.fits``), PHANGS defaults.

    Defaults from the beam (ppb = pixels per beam): box = ceil(2.5·√ppb) (a few beams, so the
    box holds many independent samples), substride = max(1, floor(√(4·ppb/π)/2.5)) (skips
    correlated neighbours), Savitzky–Golay window (ceil(nz/5)//2)·2+1, spec_box 5.
    """
    cube = read_cube(cube_path)
    header = cube.header.copy()
    data = np.asarray(cube.unmasked_data[:].value, dtype=np.float64)
    ppb = pixels_per_beam(header)
    if box is None:
        box = math.ceil(2.5 * math.sqrt(ppb))
    if substride is None:
        substride = max(1, int(math.sqrt(4.0 * ppb / math.pi) / 2.5))
    if bandpass_smooth_window is None:
        bandpass_smooth_window = (math.ceil(data.shape[0] / 5) // 2) * 2 + 1
    signal = None
    if signal_mask_path is not None:
        mdata, _ = read_array(signal_mask_path)
        if mdata.shape != data.shape:
            raise ConfigError(f"signal mask {signal_mask_path} has shape {mdata.shape}, the cube "
                              f"{cube_path} {data.shape}", "make the mask on the cube's grid")
        signal = np.nan_to_num(mdata.astype(np.float64)) > 0.5
    sigma = noise_cube(dilate_nans(data), signal, n_thresh=n_thresh, iterations=iterations,
                       box=box, spec_box=spec_box, substride=substride,
                       bandpass_smooth_window=bandpass_smooth_window,
                       bandpass_smooth_order=bandpass_smooth_order,
                       footprint=np.isfinite(data).any(axis=0)).astype(np.float32)
    if not np.isfinite(sigma).any():
        raise ConfigError(f"too few noise voxels in {cube_path} to estimate the noise "
                          f"(box {box}, more than {n_thresh} needed per box)",
                          "lower n_thresh or box in noise_kw of the derived key")
    set_data_range(header, sigma)
    return write_fits_atomic(out_path, sigma, header)
