"""Moment maps with per-pixel uncertainties, as PHANGS makes them from a masked K cube.

Every algorithm works on plain arrays, so it can be checked against known truth: ``cube`` and
``noise`` (nz, ny, nx) in K, ``mask`` (nz, ny, nx) bool, ``vaxis`` (nz,) in km/s. Each returns
``(value, error)`` maps (ny, nx). Errors are first-order propagations of independent channel
noise σ_i (the noise cube) through the estimator; Δv is the median channel width.

algorithm   value                                    error
mom0        M0 = Σ T_i Δv                            √(Σ σ_i²) Δv
mom1        M1 = Σ v_i T_i / Σ T_i                   √(Σ σ_i² (v_i − M1)²) / Σ T_i
mom2        M2 = √(Σ T_i (v_i − M1)² / Σ T_i)        √(Σ σ_i² [(v_i − M1)² − M2²]²) / (2 M2 Σ T_i)
ew          σ_EW = M0 / (T_pk √(2π))                 √(Σ σ_i² Δv²/(2π)
                                                       + (σ_EW² − 2 σ_EW Δv/√(2π)) σ_pk²) / T_pk
tpeak       max T over the mask's channel range      σ at the peak × √(Σ w²) of the boxcar
vpeak       v at that peak                           Δv
vquad       parabola vertex through the peak ±1      Jacobian of the vertex in (T₋, T_pk, T₊)
mom1wprior  strict M1, gaps filled from broad M1     the error of the map used

Reference quirks fixed here (each checked against a Monte Carlo of noisy spectra in the tests):
* mom2 error: PHANGS takes (Σ σ_i² [(v_i − M1)² − M2²]² / (Σ T)²)^{1/4}. The bracket is the
  variance of M2² (its derivative in T_i is [(v_i − M1)² − M2²]/Σ T; the M1 cross term vanishes
  because Σ T_i (v_i − M1) = 0), in (km/s)⁴. Its fourth root has the units of a velocity but is
  √σ(M2²), not σ(M2): with M2 = 10 km/s and σ(M2²) = 4 (km/s)² it says 2 km/s where the true
  error is 0.2 km/s. First order: σ(M2) = σ(M2²) / (2 M2).
* ew error: PHANGS' second term, (σ_EW² − σ_EW Δv/√(2π)) σ_pk², lacks the 1/T_pk² (it is not
  even in (km/s)²) and the factor 2 of the cross term. Differentiating σ_EW in the peak channel
  (it appears in both M0 and T_pk) gives the form in the table.
* vquad: PHANGS' shift δ = −(T₊ − T₋)/(T₊ + T₋ − 2T_pk) is twice the vertex of the parabola
  through the three channels; δ = −(T₊ − T₋)/(2(T₊ + T₋ − 2T_pk)) here. Its error propagated the
  variance, not the standard deviation (no square root), and neighbours beyond the band
  wrapped around to the other end; both are fixed.

The velocity field (``velocity_field``) stacks the mom1wprior maps of every resolution, finest
first: each pixel takes the first finite value (then an external field, if any, fills the rest).

tpeak/vpeak/vquad search the channel range spanned by any voxel of the mask, first to last
masked channel inclusive, at every pixel (they are maps of the peak, not of masked emission).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from hpcddf.errors import ConfigError
from hpcddf.phangs.convolution import PathLike, read_array, read_cube, write_fits_atomic

SQRT2PI = math.sqrt(2.0 * math.pi)
Maps = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------- helpers

def channel_width(vaxis: np.ndarray) -> float:
    """Δv: the median |channel spacing| (km/s)."""
    v = np.asarray(vaxis, dtype=float)
    return float(abs(np.median(np.diff(v)))) if v.size > 1 else 1.0


def _masked(cube: np.ndarray, noise: np.ndarray, mask: np.ndarray | None):
    cube = np.asarray(cube, dtype=np.float64)
    use = np.isfinite(cube)
    if mask is not None:
        use &= np.asarray(mask, dtype=bool)
    t = np.where(use, cube, 0.0)
    var = np.where(use, np.asarray(noise, dtype=np.float64) ** 2, 0.0)
    return use, t, var


def _nan_where(arrays: tuple[np.ndarray, ...], bad: np.ndarray) -> None:
    for a in arrays:
        a[bad] = np.nan


# ---------------------------------------------------------------- moments

def mom0(cube: np.ndarray, noise: np.ndarray, mask: np.ndarray | None, vaxis: np.ndarray,
         include_limits: bool = True, limit_width_kms: float = 10.0) -> Maps:
    """Integrated intensity (K km/s). With ``include_limits``, a line of sight that was
    observed but has no masked voxel gets 0 ± the noise of a ``limit_width_kms``-wide line."""
    dv = channel_width(vaxis)
    use, t, var = _masked(cube, noise, mask)
    value = t.sum(axis=0) * dv
    error = np.sqrt(var.sum(axis=0)) * dv
    empty = ~use.any(axis=0)
    _nan_where((value, error), empty)
    if include_limits:
        observed = empty & np.isfinite(np.asarray(cube, dtype=float)).any(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sigma = np.nanmedian(np.asarray(noise, dtype=np.float64), axis=0)
        value[observed] = 0.0
        error[observed] = (sigma * math.sqrt(limit_width_kms / dv) * dv)[observed]
    return value, error


def _first_moment(use: np.ndarray, t: np.ndarray, v: np.ndarray):
    total = t.sum(axis=0)
    bad = ~use.any(axis=0) | (total == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = (t * v[:, None, None]).sum(axis=0) / total
    m1[bad] = np.nan
    return total, m1, bad


def mom1(cube: np.ndarray, noise: np.ndarray, mask: np.ndarray | None,
         vaxis: np.ndarray) -> Maps:
    """Intensity-weighted mean velocity (km/s)."""
    v = np.asarray(vaxis, dtype=np.float64)
    use, t, var = _masked(cube, noise, mask)
    total, m1, bad = _first_moment(use, t, v)
    dev2 = (v[:, None, None] - m1[None]) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        error = np.sqrt((var * dev2).sum(axis=0)) / np.abs(total)
    error[bad] = np.nan
    return m1, error


def mom2(cube: np.ndarray, noise: np.ndarray, mask: np.ndarray | None,
         vaxis: np.ndarray) -> Maps:
    """Intensity-weighted velocity dispersion (km/s); error σ(M2²)/(2 M2), see the module."""
    v = np.asarray(vaxis, dtype=np.float64)
    use, t, var = _masked(cube, noise, mask)
    total, m1, bad = _first_moment(use, t, v)
    dev2 = (v[:, None, None] - m1[None]) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        q = (t * dev2).sum(axis=0) / total
        value = np.sqrt(q)
        sigma_q = np.sqrt((var * (dev2 - q[None]) ** 2).sum(axis=0)) / np.abs(total)
        error = sigma_q / (2.0 * value)
    bad |= ~(q > 0)
    _nan_where((value, error), bad)
    return value, error


def mom2_error_reference(cube: np.ndarray, noise: np.ndarray, mask: np.ndarray | None,
                         vaxis: np.ndarray) -> np.ndarray:
    """PHANGS' fourth-root mom2 error, kept only so the tests can show why it was replaced."""
    v = np.asarray(vaxis, dtype=np.float64)
    use, t, var = _masked(cube, noise, mask)
    total, m1, _ = _first_moment(use, t, v)
    dev2 = (v[:, None, None] - m1[None]) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        q = (t * dev2).sum(axis=0) / total
        return ((var * (dev2 - q[None]) ** 2).sum(axis=0) / total ** 2) ** 0.25


def _masked_peak(use: np.ndarray, t: np.ndarray):
    """Peak value and channel of the masked spectrum (−inf/0 where nothing is masked)."""
    peak_in = np.where(use, t, -np.inf)
    k = np.argmax(peak_in, axis=0)
    tpk = np.take_along_axis(peak_in, k[None], axis=0)[0]
    return k, tpk


def ew(cube: np.ndarray, noise: np.ndarray, mask: np.ndarray | None,
       vaxis: np.ndarray) -> Maps:
    """Equivalent-width dispersion σ_EW = M0/(T_pk √(2π)) (km/s): the σ of a Gaussian with
    that area and peak, less sensitive to faint wings than mom2."""
    dv = channel_width(vaxis)
    use, t, var = _masked(cube, noise, mask)
    k, tpk = _masked_peak(use, t)
    m0 = t.sum(axis=0) * dv
    var_pk = np.take_along_axis(var, k[None], axis=0)[0]
    bad = ~use.any(axis=0) | ~(tpk > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = m0 / (tpk * SQRT2PI)
        total_var = (var.sum(axis=0) * dv ** 2 / (2.0 * math.pi)
                     + (value ** 2 - 2.0 * value * dv / SQRT2PI) * var_pk)
        error = np.sqrt(np.clip(total_var, 0.0, None)) / tpk
    _nan_where((value, error), bad)
    return value, error


# ---------------------------------------------------------------- peaks

def _boxcar(cube: np.ndarray, dv: float, window_kms: float | None):
    """Spectrally smoothed cube (NaN-aware boxcar of window/Δv channels) and the factor
    √(Σ w²) by which it lowers independent channel noise."""
    cube = np.asarray(cube, dtype=np.float64)
    nchan = (window_kms or 0.0) / dv
    if nchan <= 1:
        return cube, 1.0
    from astropy.convolution import Box1DKernel

    weights = Box1DKernel(nchan).array
    weights = weights / weights.sum()
    finite = np.isfinite(cube)
    num = ndimage.correlate1d(np.where(finite, cube, 0.0), weights, axis=0, mode="constant")
    den = ndimage.correlate1d(finite.astype(np.float64), weights, axis=0, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        smoothed = np.where(finite, num / den, np.nan)
    return smoothed, float(np.sqrt((weights ** 2).sum()))


def _channel_range(mask: np.ndarray | None, nz: int) -> tuple[int, int] | None:
    """First and one-past-last channel holding any masked voxel (None: mask empty)."""
    if mask is None:
        return 0, nz
    chans = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=(1, 2)))
    return (int(chans[0]), int(chans[-1]) + 1) if chans.size else None


def _peak(cube: np.ndarray, noise: np.ndarray, mask: np.ndarray | None, vaxis: np.ndarray,
          window_kms: float | None):
    """(peak channel, peak value, σ at the peak, smoothed cube, noise factor, finite map)."""
    dv = channel_width(vaxis)
    smoothed, factor = _boxcar(cube, dv, window_kms)
    nz, ny, nx = smoothed.shape
    span = _channel_range(mask, nz)
    k = np.zeros((ny, nx), dtype=np.int64)
    tpk = np.full((ny, nx), np.nan)
    if span is None:
        return k, tpk, np.full((ny, nx), np.nan), smoothed, factor, np.zeros((ny, nx), bool)
    lo, hi = span
    part = np.where(np.isfinite(smoothed[lo:hi]), smoothed[lo:hi], -np.inf)
    k = lo + np.argmax(part, axis=0)
    tpk = np.take_along_axis(smoothed, k[None], axis=0)[0]
    ok = np.isfinite(part).any(axis=0) & np.isfinite(tpk)
    sigma = np.take_along_axis(np.asarray(noise, dtype=np.float64), k[None], axis=0)[0] * factor
    _nan_where((tpk, sigma), ~ok)
    return k, tpk, sigma, smoothed, factor, ok


def tpeak(cube: np.ndarray, noise: np.ndarray, mask: np.ndarray | None, vaxis: np.ndarray,
          window_kms: float | None = None) -> Maps:
    """Peak brightness (K), optionally after a ``window_kms`` boxcar (e.g. 12.5 km/s)."""
    _, tpk, sigma, _, _, _ = _peak(cube, noise, mask, vaxis, window_kms)
    return tpk, sigma


def vpeak(cube: np.ndarray, noise: np.ndarray, mask: np.ndarray | None, vaxis: np.ndarray,
          window_kms: float | None = None) -> Maps:
    """Velocity of the peak channel (km/s); error one channel."""
    k, _, _, _, _, ok = _peak(cube, noise, mask, vaxis, window_kms)
    value = np.asarray(vaxis, dtype=np.float64)[k]
    error = np.full(value.shape, channel_width(vaxis))
    _nan_where((value, error), ~ok)
    return value, error


def _neighbour(smoothed: np.ndarray, noise: np.ndarray, k: np.ndarray, step: int,
               factor: float):
    """T and σ of channel k+step; 0 (and σ 0: not a measurement) where that channel is beyond
    the band, blank or negative."""
    nz = smoothed.shape[0]
    j = k + step
    inside = (j >= 0) & (j < nz)
    jc = np.clip(j, 0, nz - 1)[None]
    t = np.take_along_axis(smoothed, jc, axis=0)[0]
    s = np.take_along_axis(np.asarray(noise, dtype=np.float64), jc, axis=0)[0] * factor
    used = inside & np.isfinite(t) & (t > 0)
    return np.where(used, t, 0.0), np.where(used, np.nan_to_num(s), 0.0)


def vquad(cube: np.ndarray, noise: np.ndarray, mask: np.ndarray | None, vaxis: np.ndarray,
          window_kms: float | None = None, maxshift: float = 0.5) -> Maps:
    """Peak velocity refined by the vertex of the parabola through the peak channel and its two
    neighbours (km/s). The shift is clipped to ±``maxshift`` channels; where it is clipped
    the parabola is not trusted and the error is one channel."""
    v = np.asarray(vaxis, dtype=np.float64)
    k, tpk, spk, smoothed, factor, ok = _peak(cube, noise, mask, v, window_kms)
    tup, sup = _neighbour(smoothed, noise, k, +1, factor)
    tdn, sdn = _neighbour(smoothed, noise, k, -1, factor)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = tup + tdn - 2.0 * tpk
        delta = -(tup - tdn) / (2.0 * denom)
        d_up = (tpk - tdn) / denom ** 2
        d_dn = (tup - tpk) / denom ** 2
        d_pk = -(tup - tdn) / denom ** 2
        sigma_delta = np.sqrt((d_up * sup) ** 2 + (d_dn * sdn) ** 2 + (d_pk * spk) ** 2)
    delta = np.nan_to_num(delta)
    clipped = np.abs(delta) >= maxshift
    delta = np.clip(delta, -maxshift, maxshift)
    channels = np.arange(v.size, dtype=np.float64)
    value = np.interp(k + delta, channels, v)
    dv = channel_width(v)
    error = np.where(clipped | ~np.isfinite(sigma_delta), dv, sigma_delta * dv)
    _nan_where((value, error), ~ok)
    return value, error


# ---------------------------------------------------------------- second round

def mom1wprior(strict_mom1: np.ndarray, strict_emom1: np.ndarray, broad_mom1: np.ndarray,
               broad_emom1: np.ndarray, broad_mom0: np.ndarray, broad_emom0: np.ndarray,
               prior_mom1: np.ndarray, vwindow_kms: float = 20.0,
               snr_thresh: float = 2.0) -> Maps:
    """Strict mom1, with its gaps filled from the broad mom1 where that is believable: the
    broad mom0 is detected (> ``snr_thresh`` σ) and the broad velocity lies within
    ``vwindow_kms`` of a low-resolution prior velocity field."""
    value = np.array(strict_mom1, dtype=np.float64)
    error = np.array(strict_emom1, dtype=np.float64)
    broad = np.asarray(broad_mom1, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        fill = (~np.isfinite(value) & np.isfinite(broad)
                & (np.asarray(broad_mom0) > snr_thresh * np.asarray(broad_emom0))
                & (np.abs(broad - np.asarray(prior_mom1)) < vwindow_kms))
    value[fill] = broad[fill]
    error[fill] = np.asarray(broad_emom1, dtype=np.float64)[fill]
    return value, error


def velocity_field(layers: Sequence[np.ndarray]) -> np.ndarray:
    """Velocity fields combined in order of trust: at each pixel the first layer with a finite
    value gives it (PHANGS' vfield: the finest mom1wprior where it has a value, coarser maps
    and then an external field only fill its gaps, never average with it)."""
    if not layers:
        raise ConfigError("no velocity field to combine",
                          "make a mom1wprior map or name a vfield in the window key")
    out = np.full(np.shape(layers[0]), np.nan)
    for layer in layers:
        layer = np.asarray(layer, dtype=np.float64)
        if layer.shape != out.shape:
            raise ConfigError(f"velocity field layers have shapes {out.shape} and "
                              f"{layer.shape}", "put the layers on one grid first")
        take = ~np.isfinite(out) & np.isfinite(layer)
        out[take] = layer[take]
    return out


# ---------------------------------------------------------------- writing maps

ALGORITHMS: dict[str, tuple[Callable[..., Maps], str, str]] = {
    # name: (function, BTYPE, BUNIT)
    "mom0": (mom0, "Moment0", "K km/s"),
    "mom1": (mom1, "Moment1", "km/s"),
    "mom2": (mom2, "Moment2", "km/s"),
    "ew": (ew, "EquivalentWidth", "km/s"),
    "tpeak": (tpeak, "PeakTemperature", "K"),
    "vpeak": (vpeak, "PeakVelocity", "km/s"),
    "vquad": (vquad, "PeakVelocityQuadratic", "km/s"),
    "mom1wprior": (mom1wprior, "Moment1", "km/s"),
}
PRIOR_MAPS = ("strict_mom1", "strict_emom1", "broad_mom1", "broad_emom1", "broad_mom0",
              "broad_emom0", "prior_mom1")


def _in_kelvin(cube: Any, path: PathLike) -> Any:
    import astropy.units as u

    if cube.unit.is_equivalent(u.K):
        return cube.to(u.K)
    if cube.unit.is_equivalent(u.Jy / u.beam):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cube.to(u.K)
        except Exception as exc:
            raise ConfigError(f"cannot convert {path} from {cube.unit} to K ({exc})",
                              "the header needs a beam and a frequency (RESTFRQ)") from exc
    raise ConfigError(f"{path} is in {cube.unit!s}, not K or Jy/beam",
                      "use the *_pbcorr_trimmed_k cube (or set BUNIT)")


def _map_header(cube: Any, btype: str, bunit: str, dv: float) -> Any:
    header = cube.wcs.celestial.to_header()
    beam = getattr(cube, "beam", None)
    if beam is not None:
        beam.attach_to_header(header, copy=False)
    header["BTYPE"] = btype
    header["BUNIT"] = bunit
    header["CHANWDTH"] = (dv, "[km/s] channel width")
    if "OBJECT" in cube.header:
        header["OBJECT"] = cube.header["OBJECT"]
    return header


def _write_pair(value: np.ndarray, error: np.ndarray, header: Any, btype: str,
                out_path: PathLike, err_path: PathLike | None) -> tuple[Path, Path | None]:
    write_fits_atomic(out_path, value.astype(np.float32), header)
    if err_path is None:
        return Path(out_path), None
    eheader = header.copy()
    eheader["BTYPE"] = f"{btype}Error"
    write_fits_atomic(err_path, error.astype(np.float32), eheader)
    return Path(out_path), Path(err_path)


def _read_mask(mask_path: PathLike | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask_path is None:
        return None
    data, _ = read_array(mask_path)
    if data.shape != shape:
        raise ConfigError(f"mask {mask_path} has shape {data.shape}, the cube {shape}",
                          "make the mask on this cube's grid")
    return np.nan_to_num(data.astype(np.float64)) > 0.5


def write_moment(cube_path: PathLike | None, noise_path: PathLike | None,
                 mask_path: PathLike | None, algorithm: str, out_path: PathLike,
                 err_path: PathLike | None = None, **kw: Any) -> tuple[Path, Path | None]:
    """Compute one moment ``algorithm`` of a cube (converted to K, velocity in km/s) and write
    it and its error as float32 maps with BTYPE, BUNIT, CHANWDTH and the beam.

    ``kw`` goes to the algorithm (e.g. ``window_kms`` for tpeak, ``include_limits`` for mom0).
    ``mom1wprior`` reads no cube: pass ``maps_to_pass={name: path}`` for every name in
    ``PRIOR_MAPS`` (the prior is reprojected onto the strict map's grid).
    """
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown moment algorithm {algorithm!r}",
                          f"use one of {', '.join(ALGORITHMS)} in the moment key")
    func, btype, bunit = ALGORITHMS[algorithm]
    if algorithm == "mom1wprior":
        return _write_mom1wprior(kw.pop("maps_to_pass", None), out_path, err_path, **kw)
    if cube_path is None or noise_path is None:
        raise ConfigError(f"moment {algorithm} needs a cube and a noise cube",
                          "make the noise cube first")
    from hpcddf.phangs.masks import velocity_axis_kms

    cube = _in_kelvin(read_cube(cube_path), cube_path)
    noise = _in_kelvin(read_cube(noise_path), noise_path)
    data = np.asarray(cube.unmasked_data[:].value, dtype=np.float64)
    sigma = np.asarray(noise.unmasked_data[:].value, dtype=np.float64)
    if sigma.shape != data.shape:
        raise ConfigError(f"noise cube {noise_path} has shape {sigma.shape}, the cube "
                          f"{data.shape}", "make the noise cube from this cube")
    vaxis = velocity_axis_kms(cube)
    value, error = func(data, sigma, _read_mask(mask_path, data.shape), vaxis, **kw)
    header = _map_header(cube, btype, bunit, channel_width(vaxis))
    return _write_pair(value, error, header, btype, out_path, err_path)


def _write_mom1wprior(maps: Mapping[str, PathLike] | None, out_path: PathLike,
                      err_path: PathLike | None, **kw: Any) -> tuple[Path, Path | None]:
    from astropy.wcs import WCS
    from reproject import reproject_interp

    missing = [name for name in PRIOR_MAPS if not maps or name not in maps]
    if missing:
        raise ConfigError(f"mom1wprior needs the maps {', '.join(missing)}",
                          "run the round-1 moments first and pass maps_to_pass")
    strict, header = read_array(maps["strict_mom1"], ndim=2)
    arrays: dict[str, np.ndarray] = {}
    for name in PRIOR_MAPS:
        data, hdr = read_array(maps[name], ndim=2)
        if name == "prior_mom1":  # a low-resolution field on its own grid
            data, _ = reproject_interp((data.astype(np.float64), WCS(hdr).celestial),
                                       WCS(header).celestial, shape_out=strict.shape,
                                       order="bilinear")
        elif data.shape != strict.shape:
            raise ConfigError(f"{name} map {maps[name]} has shape {data.shape}, the strict "
                              f"mom1 {strict.shape}", "pass maps of the same cube")
        arrays[name] = np.asarray(data, dtype=np.float64)
    value, error = mom1wprior(*(arrays[n] for n in PRIOR_MAPS), **kw)
    header = header.copy()
    header["BTYPE"] = "Moment1"
    return _write_pair(value, error, header, "Moment1", out_path, err_path)


def _velocity_map_kms(path: PathLike) -> tuple[np.ndarray, Any]:
    """A 2-D velocity map in km/s (its BUNIT converted; none means km/s) and its header."""
    import astropy.units as u

    data, header = read_array(path, ndim=2)
    text = str(header.get("BUNIT", "") or "").strip() or "km/s"
    try:
        scale = u.Unit(text, parse_strict="silent").to(u.km / u.s)
    except (u.UnitsError, ValueError) as exc:
        raise ConfigError(f"velocity field {path} is in {text!r}, not a velocity",
                          "pass a mom1/vfield map in km/s or m/s") from exc
    return np.asarray(data, dtype=np.float64) * scale, header


def write_velocity_field(map_paths: Sequence[PathLike], out_path: PathLike,
                         template: PathLike) -> Path:
    """Combine velocity maps with :func:`velocity_field` (first finite value wins, in the order
    given) on the sky grid of ``template`` (a cube or a map) and write the float32 field
    (BTYPE Velocity, km/s). Maps on another grid are reprojected bilinearly; one on the grid
    already is taken as it is."""
    from astropy.io import fits
    from astropy.wcs import WCS
    from reproject import reproject_interp

    theader = fits.getheader(template)
    twcs = WCS(theader).celestial
    shape = (int(theader["NAXIS2"]), int(theader["NAXIS1"]))
    layers = []
    for path in map_paths:
        data, header = _velocity_map_kms(path)
        wcs = WCS(header).celestial
        if data.shape != shape or not wcs.wcs.compare(twcs.wcs, tolerance=1e-9):
            data, _ = reproject_interp((data, wcs), twcs, shape_out=shape, order="bilinear")
        layers.append(data)
    header = twcs.to_header()
    header["BTYPE"] = "Velocity"
    header["BUNIT"] = "km/s"
    if "OBJECT" in theader:
        header["OBJECT"] = theader["OBJECT"]
    return write_fits_atomic(out_path, velocity_field(layers).astype(np.float32), header)
