"""Velocity-shuffled cubes: every spectrum moved so the velocity field's value sits at v = 0.

Shuffling aligns the line of every sightline of a rotating galaxy on one channel, the central
one of a new velocity axis of offsets from the velocity field, so spectra can be stacked or
integrated over a narrow, fixed window without a per-pixel mask (PHANGS' derived stage,
algorithms.md B2 step 8). Two resamplers:

* ``fft`` (the default, PHANGS's): a Fourier phase ramp shifts each spectrum by its (in
  general fractional) number of channels. It keeps the channel width and, unlike an
  interpolation, does not smooth the noise. Spectra are zero-padded before the transform so
  nothing wraps around; channels whose source lies outside the cube are NaN.
* ``linear``: linear interpolation between the two nearest channels, which also allows a new
  channel width (``channel_kms``).

``shuffle_kw`` keys (derived key): ``window`` (full width of the new axis, e.g. '30km/s': the
odd number of channels that fits in it, centred on 0) or ``nchan`` (channels of the new axis;
default the cube's), ``channel_kms`` (default the cube's; ``fft`` needs it equal to the
cube's), ``method``. Reference quirk: PHANGS reads shuffle_kw (its published derived key sets
``window``) and never passes it to the shuffle; here every key is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcddf.errors import ConfigError
from hpcddf.phangs.keyfile import Where, _fail, _suggest

if TYPE_CHECKING:  # numpy and the FITS stack are imported where used: the key readers import
    import numpy as np  # this module, and reading keys needs neither

    from hpcddf.phangs.convolution import PathLike

SHUFFLE_METHODS = ("fft", "linear")
SHUFFLE_KW: dict[str, str] = {
    "window": "a velocity such as '30km/s' (full width of the shuffled axis, about 0)",
    "nchan": "a positive integer (channels of the shuffled axis)",
    "channel_kms": "a positive number (km/s per channel of the shuffled axis)",
    "method": "'fft' or 'linear'",
}


def check_shuffle_kw(where: Where, kw: dict[Any, Any]) -> dict[str, Any]:
    """The derived key's ``shuffle_kw`` checked where it is read: an unknown key or a bad
    value is an error naming the key line."""
    if "window" in kw and "nchan" in kw:
        _fail(where, "shuffle_kw gives both window and nchan", "keep one of them")
    for key, value in kw.items():
        if key not in SHUFFLE_KW:
            _fail(where, f"shuffle_kw: unknown key {key!r}",
                  _suggest(str(key), SHUFFLE_KW, "shuffle_kw keys"))
        if key == "window":
            if not _is_velocity(value):
                _fail(where, f"shuffle_kw window {value!r} is not a positive velocity",
                      f"give {SHUFFLE_KW[key]}")
            continue
        good = (value in SHUFFLE_METHODS if key == "method" else
                isinstance(value, int) and not isinstance(value, bool) and value > 0
                if key == "nchan" else
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
        if not good:
            _fail(where, f"shuffle_kw {key!r} is {value!r}", f"give {SHUFFLE_KW[key]}")
    return dict(kw)


def _is_velocity(value: Any) -> bool:
    """A positive velocity: a number (km/s) or a string such as '30km/s'."""
    import astropy.units as u

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        quantity = u.Quantity(value)
        width = (quantity.value if quantity.unit == u.one
                 else quantity.to(u.km / u.s).value)
    except (ValueError, TypeError, u.UnitsError):
        return False
    return bool(width > 0)


# ---------------------------------------------------------------- resampling

def _source_channels(vfield: np.ndarray, v0: float, dv: float, offsets: np.ndarray
                     ) -> np.ndarray:
    """Fractional input channel of every (output channel, sightline): v = vfield + offset."""
    return (vfield[None, :] + offsets[:, None] - v0) / dv


def shuffle_fft(spectra: np.ndarray, shift: np.ndarray, nout: int) -> np.ndarray:
    """out[k, j] = spectra[k + shift[j], j] for k < nout, by a Fourier phase ramp on spectra
    zero-padded to avoid wrapping. NaN input channels count as 0 in the transform."""
    import numpy as np

    nin, nspec = spectra.shape
    length = nin + nout + 2
    padded = np.zeros((length, nspec))
    padded[:nin] = np.nan_to_num(spectra)
    freq = np.fft.rfftfreq(length)
    ramp = np.exp(2j * np.pi * freq[:, None] * shift[None, :])
    return np.fft.irfft(np.fft.rfft(padded, axis=0) * ramp, n=length, axis=0)[:nout]


def shuffle_linear(spectra: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Linear interpolation of each spectrum at its fractional channels ``index`` (nout, n)."""
    import numpy as np

    nin = spectra.shape[0]
    lo = np.clip(np.floor(index).astype(int), 0, max(nin - 2, 0))
    frac = index - lo
    cols = np.arange(spectra.shape[1])[None, :]
    hi = np.minimum(lo + 1, nin - 1)
    return spectra[lo, cols] * (1.0 - frac) + spectra[hi, cols] * frac


def shuffle_spectra(data: np.ndarray, velocity: np.ndarray, vfield: np.ndarray, *,
                    nchan: int | None = None, channel_kms: float | None = None,
                    window: float | str | None = None, method: str = "fft"
                    ) -> tuple[np.ndarray, float, int]:
    """Shuffle a cube ``data`` [chan, y, x] with channel velocities ``velocity`` (km/s,
    linear) about ``vfield`` [y, x] (km/s). Returns (cube [nchan, y, x], channel width in
    km/s with the input's sign, index of the v = 0 channel). NaN where the velocity field is
    not finite, the source falls outside the cube, or the nearest source channel is NaN."""
    import numpy as np

    from hpcddf.phangs.masks import window_kms

    nin = data.shape[0]
    if nin < 2:
        raise ConfigError("a cube with one channel cannot be shuffled", "shuffle line cubes")
    dv = float(velocity[1] - velocity[0])
    width = dv if channel_kms is None else float(np.copysign(channel_kms, dv))
    if method == "fft" and not np.isclose(abs(width), abs(dv), rtol=1e-6):
        raise ConfigError(f"shuffle_kw channel_kms {abs(width):g} differs from the cube's "
                          f"{abs(dv):g} km/s, which the fft method keeps",
                          "leave channel_kms out, or set 'method':'linear'")
    nout = nin if nchan is None else int(nchan)
    if window is not None:  # the odd number of channels within +-window/2 of 0
        nout = 2 * int(np.floor(0.5 * window_kms(window) / abs(width) + 1e-9)) + 1
    centre = nout // 2
    offsets = (np.arange(nout) - centre) * width
    spectra = data.reshape(nin, -1).astype(np.float64)
    vf = vfield.reshape(-1).astype(np.float64)
    ok = np.isfinite(vf)
    out = np.full((nout, spectra.shape[1]), np.nan)
    index = _source_channels(np.where(ok, vf, 0.0), float(velocity[0]), dv, offsets)
    if method == "fft":
        values = shuffle_fft(spectra[:, ok], index[0, ok], nout)
    elif method == "linear":
        values = shuffle_linear(spectra[:, ok], index[:, ok])
    else:
        raise ConfigError(f"unknown shuffle method {method!r}",
                          f"use one of {', '.join(SHUFFLE_METHODS)}")
    out[:, ok] = values
    nearest = np.rint(index).astype(int)
    outside = (index < -0.5) | (index > nin - 0.5)
    blank_src = ~np.isfinite(spectra[np.clip(nearest, 0, nin - 1),
                                     np.arange(spectra.shape[1])[None, :]])
    out[outside | blank_src | ~ok[None, :]] = np.nan
    return out.reshape((nout,) + data.shape[1:]).astype(np.float32), width, centre


def _shuffled_header(header: Any, nchan: int, width_kms: float, centre: int,
                     vfield_path: PathLike) -> Any:
    """The cube's header with a radio velocity-offset axis: v = 0 at channel ``centre``."""
    from astropy.wcs import WCS

    out = WCS(header).celestial.to_header()
    out["NAXIS"] = 3
    out.update({"CTYPE3": "VRAD", "CUNIT3": "m/s", "CRVAL3": 0.0, "CRPIX3": centre + 1.0,
                "CDELT3": width_kms * 1000.0, "NAXIS3": nchan})
    for key in ("BMAJ", "BMIN", "BPA", "BUNIT", "OBJECT", "RESTFRQ", "SPECSYS", "BTYPE"):
        if key in header:
            out[key] = header[key]
    out["HISTORY"] = f"hpcddf: shuffled, velocity offset from the velocity field {vfield_path}"
    return out


def shuffle_cube(cube_path: PathLike, vfield_path: PathLike, *, out_path: PathLike,
                 nchan: int | None = None, channel_kms: float | None = None,
                 window: float | str | None = None, method: str = "fft") -> Path:
    """Write the ``_shuffled`` cube of ``cube_path`` about the velocity field (a 2-D map in
    km/s, reprojected bilinearly onto the cube's sky grid as for the flat masks)."""
    import numpy as np

    from hpcddf.phangs.convolution import read_cube, set_data_range, write_fits_atomic
    from hpcddf.phangs.masks import _vfield_on_cube, velocity_axis_kms

    cube = read_cube(cube_path)
    velocity = velocity_axis_kms(cube)
    vfield = _vfield_on_cube(vfield_path, cube)
    data = np.asarray(cube.unmasked_data[:].value, dtype=np.float64)
    shuffled, width, centre = shuffle_spectra(data, velocity, vfield, nchan=nchan,
                                              channel_kms=channel_kms, window=window,
                                              method=method)
    header = _shuffled_header(cube.header, shuffled.shape[0], width, centre, vfield_path)
    set_data_range(header, shuffled)
    return write_fits_atomic(out_path, shuffled, header)
