"""Convolve a PHANGS cube to a coarser round beam, and the FITS plumbing the derived products share.

PHANGS compares galaxies at matched angular (e.g. 15") or physical (e.g. 150 pc) resolution, so
each ``*_pbcorr_trimmed_k.fits`` cube is convolved to a *round* target beam Beam(θ, θ, 0°).
With δ = (θ − Bmaj_native)/Bmaj_native:

* δ > tol: every channel is convolved with the kernel target ⊖ native
  (``SpectralCube.convolve_to``, NaNs interpolated over, then put back where the input was NaN).
  The cube is in K (a surface brightness), so no beam-area rescale is applied;
* |δ| ≤ tol: the cube is copied unchanged (the beams are already close enough);
* δ < −tol: refused, a beam finer than the data cannot be made.

The coverage cube is the finite-ness of the input (1.0 where measured, 0 elsewhere) convolved
the same way; it falls below 1 where the convolution reached blank or outside pixels, and the
strict mask only seeds signal where coverage > 0.95. ``coverage2d`` is its mean over channels.

Differences from PHANGS' ``scConvolution.smooth_cube``, on purpose:
* the optional ``velocity_resolution`` spectral boxcar is not offered. Reference quirk: that path
  calls an undefined name (``scdr``) and raises NameError whenever it is used, so no PHANGS run
  can depend on it; spectral smoothing belongs to a separate, tested step if it is ever needed;
* the whole cube is convolved in memory and written atomically, instead of channel by channel
  into a memory-mapped file (readers never see a half-written cube).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcddf.engine.atomic import atomic_path
from hpcddf.errors import ConfigError

PathLike = str | Path


# ---------------------------------------------------------------- FITS helpers shared by phangs

def read_cube(path: PathLike) -> Any:
    """The cube at ``path`` as a ``SpectralCube`` (beam, units, spectral axis from its header)."""
    from spectral_cube import SpectralCube

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cube {path} does not exist", "run the step that makes it first")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SpectralCube.read(str(path), use_dask=False)
    except Exception as exc:  # spectral-cube raises many types for a bad header
        raise ConfigError(f"cannot read cube {path}: {exc}",
                          "it must be a 3-D (or Stokes-degenerate 4-D) FITS spectral cube") from exc


def read_array(path: PathLike, ndim: int = 3) -> tuple[np.ndarray, Any]:
    """Data (leading length-1 axes dropped down to ``ndim``) and header of a FITS image."""
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"FITS file {path} does not exist", "run the step that makes it first")
    with fits.open(path, memmap=False) as hdul:
        data = np.asarray(hdul[0].data)
        header = hdul[0].header.copy()
    while data.ndim > ndim and data.shape[0] == 1:
        data = data[0]
    if data.ndim != ndim:
        raise ConfigError(f"{path} has {data.ndim} axes, expected {ndim}",
                          "pass the matching cube or map")
    return data, header


def pixels_per_beam(header: Any) -> float:
    """Beam area in pixels: π·Bmaj·Bmin/(4 ln 2) over the celestial pixel area."""
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_area
    from radio_beam import Beam

    try:
        beam = Beam.from_fits_header(header)
    except Exception as exc:
        raise ConfigError(f"no restoring beam in the header ({exc})",
                          "the cube needs BMAJ/BMIN/BPA keywords") from exc
    pix_deg2 = proj_plane_pixel_area(WCS(header).celestial)
    return float(beam.sr.to("deg2").value / pix_deg2)


def write_fits_atomic(path: PathLike, data: np.ndarray, header: Any) -> Path:
    """Write one primary HDU so that readers see the old file or the new one, never half."""
    from astropy.io import fits

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu = fits.PrimaryHDU(data=data, header=header)
    with atomic_path(path) as tmp:
        hdu.writeto(tmp, overwrite=True, output_verify="silentfix")
    return path


def set_data_range(header: Any, data: np.ndarray) -> None:
    """DATAMIN/DATAMAX from the finite values (viewers use them to scale the display)."""
    finite = data[np.isfinite(data)]
    if finite.size:
        header["DATAMIN"] = float(finite.min())
        header["DATAMAX"] = float(finite.max())


# ---------------------------------------------------------------- target beam

def target_beam(ang_res_arcsec: float | None = None, phys_res_pc: float | None = None,
                distance_mpc: float | None = None) -> Any:
    """The round beam of an angular resolution, or of a physical one at a distance."""
    import astropy.units as u
    from radio_beam import Beam

    if (ang_res_arcsec is None) == (phys_res_pc is None):
        raise ConfigError("give exactly one of ang_res_arcsec and phys_res_pc",
                          "a resolution tag is either angular (arcsec) or physical (pc)")
    if ang_res_arcsec is not None:
        theta = float(ang_res_arcsec)
    else:
        if distance_mpc is None or not distance_mpc > 0:
            raise ConfigError(f"physical resolution {phys_res_pc} pc needs a positive distance "
                              f"(got {distance_mpc})", "add the target to the distance key")
        theta = math.degrees(float(phys_res_pc) / (float(distance_mpc) * 1e6)) * 3600.0
    if not theta > 0:
        raise ConfigError(f"resolution must be positive (got {theta} arcsec)",
                          "fix the ang_res/phys_res entry of the derived key")
    return Beam(major=theta * u.arcsec, minor=theta * u.arcsec, pa=0 * u.deg)


# ---------------------------------------------------------------- smoothing

@dataclass(frozen=True)
class SmoothResult:
    out_path: Path
    action: str            # "convolved" or "copied"
    beam_arcsec: float     # major axis of the beam written to the header
    delta: float           # (θ_target − Bmaj_native) / Bmaj_native


def _native_beam(cube: Any, path: PathLike) -> Any:
    beam = getattr(cube, "beam", None)
    if beam is None:
        raise ConfigError(f"{path} has no single restoring beam (per-channel beams or none)",
                          "round the beam first (PHANGS postprocessing) and set BMAJ/BMIN/BPA")
    return beam


def _convolved(cube: Any, beam: Any) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cube.convolve_to(beam, nan_treatment="interpolate")
    data = np.array(out.unmasked_data[:].value, dtype=np.float32)
    data[~np.isfinite(cube.unmasked_data[:].value)] = np.nan
    return data


def _coverage_cube(cube: Any, native: Any, beam: Any | None) -> np.ndarray:
    """Finite-ness of the data, convolved like the data (outside the map counts as 0)."""
    import astropy.units as u
    from spectral_cube import BooleanArrayMask, SpectralCube

    finite = np.isfinite(cube.unmasked_data[:].value).astype(np.float32)
    if beam is None:
        return finite
    everywhere = BooleanArrayMask(np.ones(finite.shape, bool), wcs=cube.wcs)
    cov = SpectralCube(data=finite * u.one, wcs=cube.wcs, mask=everywhere, beam=native,
                       use_dask=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cov.convolve_to(beam, boundary="fill", fill_value=0.0)
    return np.clip(np.asarray(out.unmasked_data[:].value, dtype=np.float32), 0.0, 1.0)


def smooth_cube(in_path: PathLike, out_path: PathLike, target: Any, tol: float = 0.1, *,
                coverage_path: PathLike | None = None, coverage2d_path: PathLike | None = None,
                distance_mpc: float | None = None) -> SmoothResult:
    """Convolve (or copy) the cube at ``in_path`` to the round beam ``target``; see the module."""
    cube = read_cube(in_path)
    native = _native_beam(cube, in_path)
    theta = float(target.major.to("arcsec").value)
    bmaj = float(native.major.to("arcsec").value)
    delta = (theta - bmaj) / bmaj
    if delta < -tol:
        raise ConfigError(f"target beam {theta:.3g}\" is finer than the native {bmaj:.3g}\" "
                          f"of {in_path}", "drop this resolution from the derived key")
    convolve = delta > tol
    header = cube.header.copy()
    if convolve:
        data = _convolved(cube, target)
        target.attach_to_header(header, copy=False)
    else:
        data = np.array(cube.unmasked_data[:].value, dtype=np.float32)
    if distance_mpc is not None:
        header["DIST_MPC"] = (float(distance_mpc), "distance used for the physical resolution")
    set_data_range(header, data)
    write_fits_atomic(out_path, data, header)
    if coverage_path is not None or coverage2d_path is not None:
        _write_coverage(cube, native, target if convolve else None, header,
                        coverage_path, coverage2d_path)
    return SmoothResult(Path(out_path), "convolved" if convolve else "copied",
                        theta if convolve else bmaj, delta)


def _write_coverage(cube: Any, native: Any, beam: Any | None, header: Any,
                    coverage_path: PathLike | None, coverage2d_path: PathLike | None) -> None:
    cov = _coverage_cube(cube, native, beam)
    hdr = header.copy()
    hdr["BUNIT"] = ""
    hdr["BTYPE"] = "Coverage"
    for key in ("DATAMIN", "DATAMAX"):
        hdr.remove(key, ignore_missing=True)
    if coverage_path is not None:
        write_fits_atomic(coverage_path, cov, hdr)
    if coverage2d_path is not None:
        hdr2 = cube.wcs.celestial.to_header()
        (beam if beam is not None else native).attach_to_header(hdr2, copy=False)
        hdr2["BTYPE"] = "Coverage"
        write_fits_atomic(coverage2d_path, (cov.sum(axis=0) / cov.shape[0]).astype(np.float32),
                          hdr2)
