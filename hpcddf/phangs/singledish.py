"""The single-dish step before feathering: baseline subtraction and regridding of a TP cube.

PHANGS reduces ALMA total-power data from the raw data with ALMA's single-dish pipeline
(PHANGS' ``singledish_config`` named ``tp`` holds its options ``bl_order``, ``chan_dv_kms``,
``do_plots``). hpcddf takes the single-dish cube the singledish key names (a TP cube made by
other means, as PHANGS' README says its feathering assumes) and does, on that cube, what those
options ask for and a cube allows:

* ``bl_order``: a polynomial baseline of that order fitted to every spectrum over the
  line-free channels (outside the target's window vsys +- vwidth/2, radio velocity) and
  subtracted from all channels, as the TP pipeline fits its baselines outside the line;
* ``chan_dv_kms`` (> 0): the spectral axis regridded to channels of that width, each new
  channel the mean of the old ones it covers (fractions of channels weighted by overlap), so
  the line's integrated flux is kept; 0 keeps the cube's own channels;
* ``do_plots``: a PNG beside the product with the mean spectrum before and after, the fitted
  baseline and the excluded line window.

Pure numpy/astropy (matplotlib for the plot): it runs in the postprocess task, before the
CASA feather stage, on the node. Errors are :class:`SingleDishError` with one line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcddf.engine.atomic import atomic_path
from hpcddf.errors import HpcddfError

C_KMS = 299_792.458


class SingleDishError(HpcddfError):
    """A single-dish cube the single-dish step cannot process."""


@dataclass(frozen=True)
class SingleDishRecipe:
    """What the plan takes from singledish_config ``tp`` and the target's window."""

    bl_order: int
    chan_dv_kms: float
    do_plots: bool
    line_lo_kms: float
    line_hi_kms: float
    restfreq_hz: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SpectralAxis:
    """The cube's spectral axis (FITS axis 3): its kind, grid and radio velocities (km/s)."""

    ctype: str
    crval: float
    cdelt: float
    crpix: float
    velocities_kms: np.ndarray

    def native_per_kms(self, restfreq_hz: float) -> float:
        """Axis units per km/s of radio velocity (magnitude)."""
        if self.ctype.startswith("FREQ"):
            return restfreq_hz / C_KMS
        return 1000.0  # VRAD in m/s


def spectral_axis(header: Any, restfreq_hz: float, source: Path) -> SpectralAxis:
    """The spectral axis of a cube whose third FITS axis is FREQ (Hz) or VRAD (m/s)."""
    ctype = str(header.get("CTYPE3", "")).upper()
    if not (ctype.startswith("FREQ") or ctype.startswith("VRAD")):
        raise SingleDishError(f"single-dish cube {source}: third axis {ctype or '(none)'!r} is "
                              "neither FREQ nor VRAD (radio velocity); regrid it to one first")
    unit = str(header.get("CUNIT3", "Hz" if ctype.startswith("FREQ") else "m/s")).strip()
    if unit not in ("Hz", "m/s"):
        raise SingleDishError(f"single-dish cube {source}: CUNIT3 {unit!r}; expected Hz for "
                              "FREQ or m/s for VRAD")
    n = int(header["NAXIS3"])
    crval, cdelt, crpix = (float(header[k]) for k in ("CRVAL3", "CDELT3", "CRPIX3"))
    values = crval + (np.arange(n) + 1 - crpix) * cdelt
    vel = C_KMS * (1.0 - values / restfreq_hz) if ctype.startswith("FREQ") else values / 1000.0
    return SpectralAxis(ctype, crval, cdelt, crpix, vel)


def read_cube(source: Path) -> tuple[np.ndarray, Any]:
    """[chan, y, x] float64 and the header; degenerate 4th axes (Stokes) dropped."""
    from astropy.io import fits

    with fits.open(source) as hdul:
        data, header = hdul[0].data, hdul[0].header.copy()
    if data is None or data.ndim < 3:
        raise SingleDishError(f"single-dish cube {source} has {0 if data is None else data.ndim} "
                              "axes; expected RA, Dec and a spectral axis")
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise SingleDishError(f"single-dish cube {source} has shape {data.shape}; expected RA, "
                              "Dec, spectral and at most degenerate further axes")
    for key in [k for k in header if k[-1:] == "4" and k[:-1] in ("CTYPE", "CRVAL", "CDELT",
                                                                   "CRPIX", "CUNIT", "NAXIS")]:
        del header[key]
    header["NAXIS"] = 3
    return np.asarray(data, dtype=float), header


def fit_baselines(cube: np.ndarray, line_free: np.ndarray, order: int
                  ) -> tuple[np.ndarray, int]:
    """Per-spectrum polynomial of ``order`` fitted over the line-free channels (least squares),
    evaluated on every channel; spectra with a blank line-free channel are fitted alone on their
    finite ones, spectra with too few are left blank. Returns (baselines, spectra blanked)."""
    nchan = cube.shape[0]
    x = np.linspace(-1.0, 1.0, nchan)  # scaled channel index: a well-conditioned basis
    basis = np.polynomial.polynomial.polyvander(x, order)  # [chan, order+1]
    flat = cube.reshape(nchan, -1)
    out = np.full_like(flat, np.nan)
    free = flat[line_free]
    whole = np.isfinite(free).all(axis=0)
    if whole.any():
        coef, *_ = np.linalg.lstsq(basis[line_free], free[:, whole], rcond=None)
        out[:, whole] = basis @ coef
    blanked = 0
    for j in np.nonzero(~whole)[0]:
        ok = np.isfinite(free[:, j])
        if ok.sum() > order + 1:
            coef, *_ = np.linalg.lstsq(basis[line_free][ok], free[ok, j], rcond=None)
            out[:, j] = basis @ coef
        else:
            blanked += 1
    return out.reshape(cube.shape), blanked


def regrid_channels(cube: np.ndarray, width_chan: float) -> np.ndarray:
    """Channels of ``width_chan`` old channels (any positive real), from the first old
    channel's lower edge; each new channel is the overlap-weighted mean of the old ones (the
    cumulative sum interpolated at the new edges), so sum(value x width) is kept. A new channel
    touching a blank old channel is blank."""
    nchan = cube.shape[0]
    nnew = int(math.floor(nchan / width_chan + 1e-6))  # a rounding hair short is whole
    flat = cube.reshape(nchan, -1)
    blank = ~np.isfinite(flat)
    cum = np.vstack([np.zeros((1, flat.shape[1])), np.cumsum(np.where(blank, 0.0, flat), axis=0)])
    cumblank = np.concatenate([[0], np.cumsum(blank.any(axis=1))])
    edges = np.arange(nnew + 1) * width_chan  # in old-channel units from the lower edge
    # the cumulative sum is linear inside an old channel: interpolate it at the new edges
    i0 = np.minimum(np.floor(edges).astype(int), nchan - 1)
    frac = (edges - i0)[:, None]
    at = cum[i0] * (1.0 - frac) + cum[i0 + 1] * frac
    out = (at[1:] - at[:-1]) / width_chan
    lo = np.floor(edges[:-1]).astype(int)
    hi = np.minimum(np.ceil(edges[1:] - 1e-9).astype(int), nchan)
    touched = cumblank[hi] - cumblank[lo] > 0
    out[touched] = np.nan
    return out.reshape((nnew, *cube.shape[1:]))


def process_singledish(source: Path, out: Path, recipe: SingleDishRecipe,
                       plot: Path | None = None) -> dict[str, Any]:
    """Baseline-subtract (and regrid) the single-dish cube ``source`` into ``out`` (written
    atomically); the numbers the task records."""
    from astropy.io import fits

    cube, header = read_cube(source)
    axis = spectral_axis(header, recipe.restfreq_hz, source)
    v = axis.velocities_kms
    line_free = (v < recipe.line_lo_kms) | (v > recipe.line_hi_kms)
    if line_free.sum() < recipe.bl_order + 2:
        raise SingleDishError(f"single-dish cube {source}: {int(line_free.sum())} channels "
                              f"outside the line window {recipe.line_lo_kms:g} to "
                              f"{recipe.line_hi_kms:g} km/s, too few for a baseline of order "
                              f"{recipe.bl_order}: give a cube with line-free channels on both "
                              "sides of the line, or a lower bl_order")
    baselines, blanked = fit_baselines(cube, line_free, recipe.bl_order)
    result = cube - baselines
    native_dv = abs(float(v[1] - v[0])) if v.size > 1 else 0.0
    summary: dict[str, Any] = {
        "file": str(source), "bl_order": recipe.bl_order, "line_free_channels": int(line_free.sum()),
        "line_window_kms": [recipe.line_lo_kms, recipe.line_hi_kms], "blanked_spectra": blanked,
        "native_dv_kms": round(native_dv, 6), "nchan_in": int(cube.shape[0])}
    if recipe.chan_dv_kms > 0:
        result, header = _regridded(result, header, axis, recipe, native_dv, source)
    summary["nchan_out"] = int(result.shape[0])
    free_rms = np.nanstd((cube - baselines)[line_free])
    summary["line_free_rms"] = float(free_rms) if np.isfinite(free_rms) else None
    header["HISTORY"] = (f"hpcddf single-dish step: baseline order {recipe.bl_order} over "
                         f"{int(line_free.sum())} line-free channels"
                         + (f", regridded to {recipe.chan_dv_kms:g} km/s"
                            if recipe.chan_dv_kms > 0 else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fits.PrimaryHDU(result.astype(np.float32), header).writeto(tmp, overwrite=True)
    if recipe.do_plots and plot is not None:
        summary["plot"] = str(plot_spectra(cube, baselines, v, line_free, recipe, plot))
    return summary


def _regridded(cube: np.ndarray, header: Any, axis: SpectralAxis, recipe: SingleDishRecipe,
               native_dv: float, source: Path) -> tuple[np.ndarray, Any]:
    width_chan = recipe.chan_dv_kms / native_dv
    if width_chan > cube.shape[0]:
        raise SingleDishError(f"single-dish cube {source}: chan_dv_kms {recipe.chan_dv_kms:g} is "
                              f"wider than the whole cube ({cube.shape[0]} channels of "
                              f"{native_dv:.4g} km/s)")
    out = regrid_channels(cube, width_chan)
    header = header.copy()
    # the new channel k spans old channels [k w, (k+1) w) from the first channel's lower edge
    first_centre = axis.crval + (1 - axis.crpix) * axis.cdelt - 0.5 * axis.cdelt
    header["CDELT3"] = axis.cdelt * width_chan
    header["CRPIX3"] = 1.0
    header["CRVAL3"] = first_centre + 0.5 * header["CDELT3"]
    header["NAXIS3"] = out.shape[0]
    return out, header


def plot_spectra(cube: np.ndarray, baselines: np.ndarray, v: np.ndarray, line_free: np.ndarray,
                 recipe: SingleDishRecipe, path: Path) -> Path:
    """Mean spectrum before and after the baseline, the mean baseline, the line window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = np.nanmean(cube.reshape(cube.shape[0], -1), axis=1)
    base = np.nanmean(baselines.reshape(cube.shape[0], -1), axis=1)
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.axvspan(recipe.line_lo_kms, recipe.line_hi_kms, color="0.9", label="line window")
        ax.plot(v, mean, lw=1, label="cube (mean spectrum)")
        ax.plot(v, base, lw=1, ls="--", label=f"baseline (order {recipe.bl_order})")
        ax.plot(v, mean - base, lw=1, label="baseline-subtracted")
        ax.plot(v[line_free], (mean - base)[line_free], ".", ms=2, color="k", label="fitted channels")
        ax.set_xlabel("radio velocity (km/s)")
        ax.set_ylabel("mean brightness")
        ax.legend(fontsize=7)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)
    return path
